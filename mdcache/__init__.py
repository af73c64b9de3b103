"""mdcache: run a frozen teacher once, store its patch targets for K views per image, share them."""
__version__ = "0.1.0"

from .errors import CacheError, UserError  # noqa: E402,F401
from .store import Cache, list_caches, open_cache  # noqa: E402,F401
from .views import replay  # noqa: E402,F401
