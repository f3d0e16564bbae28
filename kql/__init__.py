"""KQL: declarative, fast and exact occlusion heat maps for image CNNs.

>>> import kql
>>> kql.parse("SHOW MODELS")
[ShowModels()]
"""

from .api import Connection, connect, execute
from .errors import (KqlError, KqlExecutionError, KqlImageError, KqlModelError,
                     KqlNotSupportedError, KqlPlanError, KqlSyntaxError)
from .parser import parse
from .result import Result

__version__ = "0.1.0"

__all__ = ["Connection", "connect", "execute", "parse", "Result", "KqlError", "KqlSyntaxError",
           "KqlPlanError", "KqlNotSupportedError", "KqlModelError", "KqlImageError",
           "KqlExecutionError", "__version__"]
