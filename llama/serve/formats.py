"""response_format: what a reply must match, as a grammar (llama/constraints.py) compiled in the
HTTP handler, so a schema the library cannot use is answered with a 400 before the request queues.

{"type": "text"}: no constraint. {"type": "json_object"}: any JSON object. {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}: JSON valid under the schema, whether strict is true
or not (it is always enforced)."""

import asyncio
from typing import Optional

from ..constraints import Grammar, GrammarError
from .schemas import ApiError, ResponseFormat


def response_grammar(response_format: Optional[ResponseFormat]) -> Optional[Grammar]:
    """The grammar the reply must match, or None; raises ApiError 400 for a schema that cannot be compiled."""
    if response_format is None or response_format.type == "text":
        return None
    spec = response_format.json_schema
    try:
        if spec is None:  # json_object
            return Grammar.json_object()
        return Grammar.json_schema(spec.json_schema, spec.name)
    except ImportError as e:  # llguidance is missing (it comes with the serve extra)
        raise ApiError(501, f"response_format: {e}", param="response_format") from None
    except GrammarError as e:
        raise ApiError(400, f"response_format.json_schema.schema: the schema {spec.name!r} cannot be used for "
                            f"constrained decoding: {e}", param="response_format", code="invalid_schema") from None


async def compile_response_format(response_format: Optional[ResponseFormat]) -> Optional[Grammar]:
    """response_grammar on a worker thread: a large schema takes a while to compile, and the event
    loop serves the other requests meanwhile."""
    if response_format is None or response_format.type == "text":
        return None
    return await asyncio.get_running_loop().run_in_executor(None, response_grammar, response_format)
