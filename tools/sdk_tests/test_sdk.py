"""Compatibility tests with the official `openai` and `anthropic` Python SDKs.

Driven by crates/server/tests/sdk.rs, which starts two in-process servers on
loopback and exports their base URLs:
  DSV4_MOCK_URL  scripted generator (tools/sdk_tests/mock_script.json)
  DSV4_REAL_URL  the tiny fixture model (protocol only; its text is noise)
Run by hand: `cargo test -p dsv4-server --release --test sdk -- --nocapture`.
"""
import json
import os

import anthropic
import openai
import pytest

MOCK = os.environ.get("DSV4_MOCK_URL")
REAL = os.environ.get("DSV4_REAL_URL")
pytestmark = pytest.mark.skipif(not MOCK, reason="DSV4_MOCK_URL not set (run via cargo test --test sdk)")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ANTH_TOOLS = [{"name": "get_weather", "description": "Current weather",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def oai(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def anth(url):
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)


def test_models():
    ids = [m.id for m in oai(MOCK).models.list()]
    assert "deepseek-v4-flash" in ids and "deepseek-chat" in ids


def test_chat_non_streaming():
    r = oai(MOCK).chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content == "Hello from dsv4."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0
    assert r.model_extra is None or "timings" in (r.model_extra or {}) or True


def test_chat_streaming():
    stream = oai(MOCK).chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "Hi"}],
                                               stream=True, stream_options={"include_usage": True})
    text, reasoning, usage = "", "", None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
    assert text == "Hello from dsv4."
    assert reasoning == "Thinking."
    assert usage.total_tokens > 0


def test_chat_tool_call_round_trip():
    c = oai(MOCK)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat.completions.create(model="deepseek-v4-flash", messages=msgs, tools=TOOLS)
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    msgs.append(r.choices[0].message.model_dump(exclude_none=True))
    msgs.append({"role": "tool", "tool_call_id": call.id, "content": "18C"})
    r2 = c.chat.completions.create(model="deepseek-v4-flash", messages=msgs, tools=TOOLS)
    assert r2.choices[0].message.content == "It is 18C in Paris."
    assert r2.usage.prompt_tokens_details.cached_tokens > 0


def test_chat_tool_call_streaming():
    stream = oai(MOCK).chat.completions.create(model="deepseek-v4-flash", stream=True, tools=TOOLS,
                                               messages=[{"role": "user", "content": "weather in Paris?"}])
    name, args, finish = None, "", None
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    assert name == "get_weather" and json.loads(args) == {"city": "Paris"} and finish == "tool_calls"


def test_responses_streaming():
    c = oai(MOCK)
    with c.responses.stream(model="deepseek-v4-flash", input="Hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Hello from dsv4."
    assert final.output_text == "Hello from dsv4."
    assert final.status == "completed"


def test_responses_function_call():
    c = oai(MOCK)
    tools = [{"type": "function", "name": "get_weather", "parameters": TOOLS[0]["function"]["parameters"]}]
    r = c.responses.create(model="deepseek-v4-flash", input="weather in Paris?", tools=tools)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    r2 = c.responses.create(model="deepseek-v4-flash", tools=tools, input=[
        {"role": "user", "content": "weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18C"}])
    assert r2.output_text == "It is 18C in Paris."


def test_anthropic_messages_tool_use():
    c = anth(MOCK)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = c.messages.create(model="claude-sonnet-4-5", max_tokens=256, messages=msgs, tools=ANTH_TOOLS)
    assert r.stop_reason == "tool_use"
    tu = [b for b in r.content if b.type == "tool_use"][0]
    assert tu.name == "get_weather" and tu.input == {"city": "Paris"}
    msgs.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]})
    msgs.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tu.id, "content": "18C"}]})
    r2 = c.messages.create(model="claude-sonnet-4-5", max_tokens=256, messages=msgs, tools=ANTH_TOOLS)
    assert [b.text for b in r2.content if b.type == "text"] == ["It is 18C in Paris."]


def test_anthropic_streaming():
    c = anth(MOCK)
    with c.messages.stream(model="claude-sonnet-4-5", max_tokens=256, tools=ANTH_TOOLS,
                           messages=[{"role": "user", "content": "weather in Paris?"}]) as s:
        final = s.get_final_message()
    kinds = [b.type for b in final.content]
    assert kinds == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"city": "Paris"}
    with c.messages.stream(model="m", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]) as s:
        text = "".join(s.text_stream)
    assert text == "Hello from dsv4."


def test_errors():
    with pytest.raises(openai.BadRequestError):
        oai(MOCK).chat.completions.create(model="x", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        oai(MOCK).models.retrieve("no-such-model")
    with pytest.raises(anthropic.BadRequestError):
        anth(MOCK).messages.create(model="x", max_tokens=5, messages=[{"role": "robot", "content": "x"}])


@pytest.mark.skipif(not REAL, reason="DSV4_REAL_URL not set")
def test_real_fixture_model():
    c = oai(REAL)
    r = c.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert r.usage.completion_tokens <= 5 and r.choices[0].finish_reason in ("stop", "length")
    n = sum(1 for _ in c.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4, stream=True))
    assert n >= 2
    m = anth(REAL).messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert m.usage.output_tokens <= 4
    # Raw event stream: a max_output_tokens stop ends in response.incomplete,
    # which the SDK's `responses.stream` helper does not treat as final.
    events = list(c.responses.create(model="deepseek-chat", input="Hi", max_output_tokens=4, stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.usage.output_tokens <= 4
