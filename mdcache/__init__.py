"""mdcache: run a frozen teacher once, store its patch targets for K views per image, share them."""
__version__ = "0.1.0"

from .store import Cache, CacheError, open_cache, list_caches  # noqa: E402,F401
from .views import replay  # noqa: E402,F401
