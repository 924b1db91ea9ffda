"""The Flower-free, Hydra-free core: models, loops, BatchNorm statistics, aggregation, seeding.

Nothing in this package imports ``flwr``, ``hydra`` or ``omegaconf``
(``tests/test_layout.py`` enforces it): the centralised recipe, the Flower
adapters and the tests all call the same functions with plain arguments.
"""
