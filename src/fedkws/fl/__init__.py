"""The Flower adapter: ClientApp, the server side of the messaging, the simulation backends."""

import logging

# Flower's state database (alembic) logs its plugin set-up at INFO when first
# imported; set the level before anything here imports Flower.
logging.getLogger("alembic").setLevel(logging.WARNING)
