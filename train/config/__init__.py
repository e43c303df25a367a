from train.config.schemas import *  # noqa: F401,F403  (temporary while the package is split)
from train.config.schemas import _require_positive  # noqa: F401
