"""OpenAI / vLLM structured-output fields -> one `StructuredOutputsParams` (as a dict).

Accepted: `response_format` ({"type": "text" | "json_object" | "json_schema"}), vLLM's extras
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and `structured_outputs`
(newer vLLM's dict), and, on chat, `tools` with `tool_choice` "required" or a named function:
the output is then constrained to a call's JSON and returned as `message.tool_calls`.
`tool_choice` "auto" (the default when tools are given) would need a parser for the model's own
tool-call format, which raylm does not have: 400. "none" generates plain text.

At most one of these may constrain a request; every error is a 400 naming the field the client
sent (a bad schema or regex included: it is compiled here, before the request is queued).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from raylm.cluster.serve.errors import ServeError
from raylm.cluster.structured_outputs import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}
# A function without `parameters` takes none (OpenAI): its arguments are the empty object.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def _bad(param: str, message: str) -> ServeError:
    return ServeError("invalid_argument", f"{param}: {message}", param)


@dataclass(frozen=True)
class ToolCallMode:
    """How a constrained output becomes tool calls: `function` names the forced function (the
    output is its arguments); None means tool_choice "required" (the output is
    {"name": ..., "arguments": {...}} for one of the tools)."""

    function: str | None


def _response_format(value: Any) -> dict | None:
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object",
                                                                "json_schema"):
        raise _bad("response_format", "expected {\"type\": \"text\" | \"json_object\" | "
                   "\"json_schema\"}")
    kind = value["type"]
    extra = sorted(set(value) - {"type"} - ({"json_schema"} if kind == "json_schema" else set()))
    if extra:
        raise _bad("response_format", f"unexpected field {extra[0]!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    js = value.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("name"), str):
        raise _bad("response_format", "json_schema needs an object with a name and a schema")
    unknown = sorted(set(js) - _JSON_SCHEMA_KEYS)
    if unknown:
        raise _bad("response_format", f"json_schema: unexpected field {unknown[0]!r}")
    schema = js.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise _bad("response_format", "json_schema.schema must be an object")
    return {"json": schema}


def _tools(tools: Any) -> dict[str, dict]:
    """name -> parameters schema, validating OpenAI's tool list."""
    if not isinstance(tools, list) or not tools:
        raise _bad("tools", "expected a non-empty list of {\"type\": \"function\", \"function\": "
                   "{\"name\": ..., \"parameters\": {...}}}")
    out: dict[str, dict] = {}
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if (not isinstance(tool, dict) or tool.get("type") != "function"
                or not isinstance(fn, dict) or not isinstance(fn.get("name"), str)):
            raise _bad("tools", "each tool must be {\"type\": \"function\", \"function\": "
                       "{\"name\": ...}}")
        params = fn.get("parameters") or _NO_PARAMETERS
        if not isinstance(params, dict):
            raise _bad("tools", f"function {fn['name']!r}: parameters must be an object")
        if fn["name"] in out:
            raise _bad("tools", f"function {fn['name']!r} is listed twice")
        out[fn["name"]] = params
    return out


def _tool_spec(tools: Any, tool_choice: Any) -> tuple[dict | None, ToolCallMode | None]:
    if tool_choice == "none":
        if tools is not None:
            _tools(tools)
        return None, None
    if tools is None:
        raise _bad("tool_choice", "needs tools")
    functions = _tools(tools)
    if tool_choice is None or tool_choice == "auto":
        raise _bad("tool_choice", "'auto' (the default with tools) needs a parser for this "
                   "model's tool-call format, which is not available; use 'required', a named "
                   "function ({\"type\": \"function\", \"function\": {\"name\": ...}}) or 'none'")
    if tool_choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for name, params in functions.items()]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return {"json": schema}, ToolCallMode(None)
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if (not isinstance(tool_choice, dict) or tool_choice.get("type") != "function"
            or not isinstance(fn, dict) or not isinstance(fn.get("name"), str)):
        raise _bad("tool_choice", "expected 'none', 'auto', 'required' or {\"type\": "
                   "\"function\", \"function\": {\"name\": ...}}")
    if fn["name"] not in functions:
        raise _bad("tool_choice", f"function {fn['name']!r} is not one of the tools")
    return {"json": functions[fn["name"]]}, ToolCallMode(fn["name"])


def structured_outputs(body: Any, chat: bool) -> tuple[dict | None, ToolCallMode | None]:
    """The request's structured-output spec (SamplingParams.structured_outputs' dict form) and,
    for tool calls, how to report them. Raises ServeError naming the field."""
    sources: list[tuple[str, dict]] = []
    if body.response_format is not None:
        spec = _response_format(body.response_format)
        if spec is not None:
            sources.append(("response_format", spec))
    for field, kind in _GUIDED.items():
        value = getattr(body, field)
        if value is not None:
            sources.append((field, {kind: value}))
    if body.structured_outputs is not None:
        if not isinstance(body.structured_outputs, dict):
            raise _bad("structured_outputs", "expected an object")
        sources.append(("structured_outputs", body.structured_outputs))
    mode = None
    if body.tools is not None or body.tool_choice is not None:
        if not chat:
            param = "tools" if body.tools is not None else "tool_choice"
            raise _bad(param, "only chat completions take tools")
        spec, mode = _tool_spec(body.tools, body.tool_choice)
        if spec is not None:
            sources.append(("tool_choice", spec))
    if body.parallel_tool_calls is not None and not isinstance(body.parallel_tool_calls, bool):
        raise _bad("parallel_tool_calls", "expected a boolean")
    if not sources:
        return None, None
    if len(sources) > 1:
        raise _bad(sources[1][0], f"cannot be combined with {sources[0][0]}: one structured "
                   f"output constraint per request")
    param, spec = sources[0]
    try:
        params = StructuredOutputsParams.coerce(spec)
    except ValueError as exc:
        message = str(exc).removeprefix("structured_outputs")
        raise _bad(param, message.lstrip(".: ") or str(exc)) from None
    return asdict(params), mode
