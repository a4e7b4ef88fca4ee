"""Pure tensor maths of posttrain (imports only torch and the standard library).

Importing this package registers every formula: ``ADVANTAGES``, ``TOKEN_WEIGHTS``, ``ENTROPY_TERMS``,
``AGGREGATES`` (reward-model ensembles).
"""

from posttrain.algos import advantages, ensembles, entropy_terms, token_weights
from posttrain.algos.registry import ADVANTAGES, AGGREGATES, ENTROPY_TERMS, TOKEN_WEIGHTS, Registry

__all__ = ["ADVANTAGES", "AGGREGATES", "ENTROPY_TERMS", "TOKEN_WEIGHTS", "Registry", "advantages", "ensembles",
           "entropy_terms", "token_weights"]
