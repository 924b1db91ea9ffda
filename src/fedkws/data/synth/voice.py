"""espeak-ng through ctypes: the synthesiser behind every synthetic speaker."""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# English accents in preference order; only those present in the shipped
# espeak-ng data are used. en-Shaw is left out: it is a spelling, not an accent.
_ACCENTS = (
    "en",
    "en-US",
    "en-GB-scotland",
    "en-GB-x-rp",
    "en-GB-x-gbclan",
    "en-GB-x-gbcwmd",
    "en-029",
    "en-US-nyc",
)
# Voice variants that sound like people. Robotic, whispering and effect
# variants (robosoft*, Demonic, Tweaky, UniRobot, whisper...) are left out:
# they would make speakers trivially separable rather than realistic.
_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
    "croak", "Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Diogo",
    "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Mario", "Michael",
    "Mike", "Nguyen", "Reed", "RicishayMax", "Storm", "adam", "anika",
    "announcer", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb",
    "david", "ed", "edward", "edward2", "grandma", "grandpa", "gustave", "ian",
    "iven", "iven3", "iven4", "john", "kaukovalta", "linda", "marcelo", "max",
    "michel", "miguel", "mike2", "norbert", "pablo", "paul", "pedro", "quincy",
    "rob", "robert", "sandro", "shelby", "steph", "steph2", "steph3", "travis",
    "victor", "zac",
)  # fmt: skip

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def _libc_srand():
    """The C library's ``srand`` (None where it cannot be opened this way)."""
    try:
        srand = ctypes.CDLL(None).srand
    except (OSError, AttributeError, TypeError):  # TypeError: no CDLL(None) on Windows
        return None
    srand.argtypes = [ctypes.c_uint]
    srand.restype = None
    return srand


class Espeak:
    """A minimal ctypes binding to libespeak-ng in synchronous mode.

    The library is process-global state, so there is one instance per process
    (:meth:`get`) and it must not be used from several threads at once.
    :meth:`reset` unloads and reloads the shared library, which restores every
    static variable of the synthesiser to its initial value; it costs about
    0.3 ms plus about 3 ms for the next voice load.

    Attributes
    ----------
    sample_rate
        Native output rate of espeak-ng (22050 Hz).
    reproducible
        Whether :meth:`reset` was verified to restore a fresh state. It is
        False if another component of the process holds the same library
        open, in which case clips are still valid but not byte-reproducible.
    """

    _AUDIO_OUTPUT_SYNCHRONOUS = 2
    _POS_CHARACTER = 1
    _CHARS_UTF8 = 1
    _PARAM_RATE = 1
    _PARAM_PITCH = 3
    _PARAM_RANGE = 4

    _instance: Espeak | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        import espeakng_loader

        self._lib_path = espeakng_loader.get_library_path()
        self.data_path = Path(espeakng_loader.get_data_path())
        self._chunks: list[np.ndarray] = []
        # ctypes only keeps a raw pointer: the Python callback object must
        # outlive every synthesis, hence an attribute.
        self._callback = _SYNTH_CALLBACK(self._collect)
        self._lib: ctypes.CDLL | None = None
        self.lock = threading.Lock()
        self.sample_rate = 0
        self.version = ""
        self._load()
        self.reproducible = self._check_reset()
        if not self.reproducible:
            log.warning(
                "libespeak-ng is held open elsewhere in this process; synthetic clips "
                "will not be byte-reproducible"
            )

    @classmethod
    def get(cls) -> Espeak:
        """The process-wide instance, created (and the library loaded) on first use."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _load(self) -> None:
        lib = ctypes.CDLL(self._lib_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Terminate.restype = ctypes.c_int
        rate = lib.espeak_Initialize(
            self._AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), 0
        )
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed with data at {self.data_path}")
        lib.espeak_SetSynthCallback(self._callback)
        # Breath and Klatt noise draw from espeak's own generator; older
        # builds lack the setter and use libc rand(), reset by the reload.
        self._set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self._set_seed is not None:
            self._set_seed.argtypes = [ctypes.c_long]
        # Some voice variants (+caleb and +Reed among them) also draw from libc's
        # rand(), whose state a reload does not reset: it is seeded before every synthesis.
        self._srand = _libc_srand()
        self._lib = lib
        self.sample_rate = rate
        self.version = (lib.espeak_Info(None) or b"").decode()

    def _unload(self) -> None:
        if self._lib is None:
            return
        import _ctypes

        lib, self._lib = self._lib, None
        lib.espeak_Terminate()
        close = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
        if close is not None:
            close(lib._handle)

    def reset(self) -> None:
        """Reload the library so the next synthesis starts from a fresh state."""
        self._unload()
        self._load()

    def _check_reset(self) -> bool:
        # Without a real unload the second call would continue from the state
        # the first left behind and come out different.
        first = self.synth("yes", "gmw/en")
        self.reset()
        second = self.synth("yes", "gmw/en")
        self.reset()
        return np.array_equal(first, second)

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def synth(
        self,
        text: str,
        voice: str,
        rate: float = 175,
        pitch: float = 50,
        pitch_range: float = 50,
        noise_seed: int = 1,
    ) -> np.ndarray:
        """Speak ``text`` and return int16 samples at :attr:`sample_rate`.

        Hold :attr:`lock` around calls (and around :meth:`reset`) if other
        threads may use the synthesiser.

        Parameters
        ----------
        text
            UTF-8 text; punctuation shapes the intonation.
        voice
            espeak voice name such as ``"gmw/en-US+f2"`` (language file, then an
            optional ``+variant``).
        rate
            Words per minute (80 to 450).
        pitch, pitch_range
            Base pitch and pitch range, 0 to 100 (50 is the voice's default).
        noise_seed
            Seed for the synthesiser's internal noise generator.

        Raises
        ------
        ValueError
            If espeak-ng does not know the voice.
        RuntimeError
            If synthesis fails.
        """
        lib = self._lib
        if lib is None:
            raise RuntimeError("espeak-ng is not loaded")
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        lib.espeak_SetParameter(self._PARAM_RATE, int(np.clip(rate, 80, 450)), 0)
        lib.espeak_SetParameter(self._PARAM_PITCH, int(np.clip(pitch, 0, 100)), 0)
        lib.espeak_SetParameter(self._PARAM_RANGE, int(np.clip(pitch_range, 0, 100)), 0)
        if self._set_seed is not None:
            self._set_seed(int(noise_seed))
        if self._srand is not None:
            self._srand(int(noise_seed) & 0xFFFFFFFF)
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        status = lib.espeak_Synth(
            data, len(data), 0, self._POS_CHARACTER, 0, self._CHARS_UTF8, None, None
        )
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed ({status}) for {text!r} with {voice!r}")
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)

    def accents(self) -> tuple[str, ...]:
        """English accents shipped with the data, as voice names (``gmw/en-US``)."""
        lang_dir = self.data_path / "lang" / "gmw"
        return tuple(f"gmw/{a}" for a in _ACCENTS if (lang_dir / a).is_file())

    def variants(self) -> tuple[str, ...]:
        """Human-sounding voice variants shipped with the data."""
        variant_dir = self.data_path / "voices" / "!v"
        return tuple(v for v in _VARIANTS if (variant_dir / v).is_file())
