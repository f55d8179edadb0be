"""Chat prompts beyond plain text (images, tools, tool calls, names), for tests that check that the
simulated upstream and the gateway count them alike."""

from __future__ import annotations

from typing import Any

IMAGE: str = "data:image/png;base64," + "iVBORw0KGgo" * 50
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {
                    "type": "string",
                    "description": "The unit of temperature to return",
                    "enum": ["celsius", "fahrenheit"],
                },
            },
            "required": ["location"],
        },
    },
}
# The cookbook's tool example ("How to count tokens with tiktoken", section 7): the API reported
# 101 prompt tokens for gpt-4o and 105 for gpt-3.5-turbo / gpt-4.
TOOL_CHAT: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
        {"role": "user", "content": "What's the weather like in San Francisco?"},
    ],
    "tools": [WEATHER_TOOL],
}
IMAGE_CHAT: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "Describe pictures tersely."},
        {
            "role": "user",
            "name": "alice",
            "content": [
                {"type": "text", "text": "What is on these two pictures?"},
                {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.invalid/b.png"}},
            ],
        },
    ]
}
TOOL_CALL_CHAT: dict[str, Any] = {
    "messages": [
        *TOOL_CHAT["messages"],
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_current_weather", "arguments": '{"location":"San Francisco"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "unit": "celsius"}'},
        {"role": "assistant", "content": None, "function_call": {"name": "get_current_weather", "arguments": "{}"}},
    ],
    "tools": [WEATHER_TOOL],
    "max_tokens": 40,
    "n": 2,
}
FUNCTIONS_CHAT: dict[str, Any] = {"messages": TOOL_CHAT["messages"], "functions": [WEATHER_TOOL["function"]]}
EVERYTHING_CHAT: dict[str, Any] = {
    "messages": IMAGE_CHAT["messages"] + TOOL_CALL_CHAT["messages"],
    "tools": [WEATHER_TOOL],
}
# Tool calls and a tool definition with one low-detail image: a prompt the simulator used to count
# higher than the gateway (tools as their JSON), so a burst of them drew upstream 429s.
TOOLS_AND_LOW_DETAIL_IMAGE_CHAT: dict[str, Any] = {
    "messages": [
        *TOOL_CALL_CHAT["messages"],
        {
            "role": "user",
            "name": "alice",
            "content": [
                {"type": "text", "text": "And what is on this picture?"},
                {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}},
            ],
        },
    ],
    "tools": [WEATHER_TOOL],
}
