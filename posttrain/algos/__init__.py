"""Pure tensor maths of posttrain (imports only torch and the standard library).

Importing this package registers every formula: ``ADVANTAGES``, ``TOKEN_WEIGHTS``, ``ENTROPY_TERMS``.
"""

from posttrain.algos import advantages, entropy_terms, token_weights
from posttrain.algos.registry import ADVANTAGES, ENTROPY_TERMS, TOKEN_WEIGHTS, Registry

__all__ = ["ADVANTAGES", "ENTROPY_TERMS", "TOKEN_WEIGHTS", "Registry", "advantages", "entropy_terms", "token_weights"]
