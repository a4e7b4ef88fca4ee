"""Pure tensor maths of posttrain (imports only torch and the standard library).

Importing this package registers every formula: ``ADVANTAGES``, ``TOKEN_WEIGHTS``, ``ENTROPY_TERMS``,
``AGGREGATES`` (reward-model ensembles).
Module dependencies point one way: registry, context, state <- advantages, token_weights, entropy_terms, ensembles.
"""

from posttrain.algos import advantages, ensembles, entropy_terms, token_weights
from posttrain.algos.context import EntropyContext, TokenContext
from posttrain.algos.registry import ADVANTAGES, AGGREGATES, ENTROPY_TERMS, TOKEN_WEIGHTS, Entry, Registry

__all__ = ["ADVANTAGES", "AGGREGATES", "ENTROPY_TERMS", "TOKEN_WEIGHTS", "Entry", "EntropyContext", "Registry",
           "TokenContext", "advantages", "ensembles", "entropy_terms", "token_weights"]
