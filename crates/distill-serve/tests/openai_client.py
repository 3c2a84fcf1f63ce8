"""The official `openai` Python client against a running `distill serve`.

    python3 openai_client.py BASE_URL MODEL [API_KEY] [--thinking]

Checks non-streaming and streaming chat and completions: the streamed deltas join into the
non-streamed answer, the first chat delta carries the role, the finish reason comes on each
choice's last chunk, `stream_options.include_usage` adds a usage-only last chunk, and (with
--thinking, a model whose template opens `<think>`) the reasoning arrives as
`reasoning_content` deltas. Exits non-zero with the failed check's message.

Run by crates/distill-serve/tests/server.rs when `python3 -c 'import openai'` works.
"""

import sys

import openai
from openai import OpenAI


def check(cond, msg):
    if not cond:
        raise SystemExit(f"FAILED: {msg}")


def reasoning_of(obj):
    # reasoning_content is an extension: the SDK keeps unknown fields as extra attributes.
    return getattr(obj, "reasoning_content", None) or (getattr(obj, "model_extra", None) or {}).get(
        "reasoning_content"
    )


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    thinking = "--thinking" in sys.argv
    base_url, model = args[0], args[1]
    key = args[2] if len(args) > 2 else "unused"
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "What is 2+3? Think step by step."}]
    common = dict(model=model, temperature=0, max_tokens=24, extra_body={"ignore_eos": True})

    # Chat, whole and streamed.
    whole = client.chat.completions.create(messages=messages, **common)
    choice = whole.choices[0]
    check(whole.object == "chat.completion", whole.object)
    check(whole.usage.completion_tokens == 24, whole.usage)
    stream = client.chat.completions.create(
        messages=messages, stream=True, stream_options={"include_usage": True}, **common
    )
    content, reasoning, finish, roles, usage = "", "", [], [], None
    for chunk in stream:
        check(chunk.object == "chat.completion.chunk", chunk.object)
        if not chunk.choices:
            usage = chunk.usage
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        content += delta.content or ""
        reasoning += reasoning_of(delta) or ""
        if chunk.choices[0].finish_reason:
            finish.append(chunk.choices[0].finish_reason)
    check(roles == ["assistant"], f"role deltas {roles}")
    check(content == (choice.message.content or ""), f"content {content!r} vs {choice.message.content!r}")
    check(reasoning == (reasoning_of(choice.message) or ""), f"reasoning {reasoning!r}")
    check(finish == [choice.finish_reason], f"finish {finish} vs {choice.finish_reason}")
    check(usage is not None and usage.total_tokens == whole.usage.total_tokens, f"usage {usage}")
    if thinking:
        check(reasoning and not content, f"a thinking model cut off while thinking: {reasoning!r} {content!r}")

    # Completions, whole and streamed, two seeded choices.
    prompt = "Once upon a time"
    sampled = dict(model=model, temperature=1.0, max_tokens=16, n=2, seed=7)
    whole = client.completions.create(prompt=prompt, **sampled)
    check(whole.object == "text_completion", whole.object)
    texts, finishes = ["", ""], [[], []]
    for chunk in client.completions.create(prompt=prompt, stream=True, **sampled):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finishes[c.index].append(c.finish_reason)
    for c in whole.choices:
        check(texts[c.index] == c.text, f"choice {c.index}: {texts[c.index]!r} vs {c.text!r}")
        check(finishes[c.index] == [c.finish_reason], f"choice {c.index}: {finishes[c.index]}")

    # Errors come as the SDK's exceptions.
    try:
        client.chat.completions.create(model=model, messages=messages, n=0)
        check(False, "n=0 was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "n" in str(e), str(e))
    if key != "unused":
        try:
            OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
            check(False, "a wrong key was accepted")
        except openai.AuthenticationError as e:
            check(e.status_code == 401 and "wrong" not in str(e), str(e))
    print("openai client: all checks passed")


if __name__ == "__main__":
    main()
