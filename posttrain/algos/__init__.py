"""Pure tensor maths of posttrain (imports only torch and the standard library).

Importing this package registers every formula: ``ADVANTAGES``, ``TOKEN_WEIGHTS``, ``ENTROPY_TERMS``.
Module dependencies point one way: registry, context, state <- advantages, token_weights, entropy_terms.
"""

from posttrain.algos import advantages, entropy_terms, token_weights
from posttrain.algos.context import EntropyContext, TokenContext
from posttrain.algos.registry import ADVANTAGES, ENTROPY_TERMS, TOKEN_WEIGHTS, Entry, Registry

__all__ = ["ADVANTAGES", "ENTROPY_TERMS", "TOKEN_WEIGHTS", "Entry", "EntropyContext", "Registry", "TokenContext",
           "advantages", "entropy_terms", "token_weights"]
