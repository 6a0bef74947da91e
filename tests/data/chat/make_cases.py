#!/usr/bin/env python3
"""Writes cases.json: conversations rendered by Hugging Face's own chat templates, the reference
models/chat_template.cpp is tested against (tests/test_chat.cpp).

Rendered the way transformers renders them (PreTrainedTokenizerBase.apply_chat_template): jinja2 with
trim_blocks and lstrip_blocks, loop controls, and a raise_exception global. The templates come from
../shared/tokenizers/*/tokenizer_config.json where that folder has one (read, not copied); Llama-2-chat's
, Mistral-7B-Instruct-v0.1's and plain ChatML's are written out below as the hub's tokenizer_config.json files have them.

    python3 tests/data/chat/make_cases.py [SHARED_DIR]     (needs jinja2)
"""
import json
import os
import sys

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "..", "..", "shared")

# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json "chat_template".
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
          "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
          "user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = "
          "'<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}"
          "{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif "
          "message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json "chat_template".
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
           "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# The plain ChatML template (no default system message), as many fine-tunes ship it.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def render(template, bos, eos, messages, add_generation_prompt):
    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    t = env.from_string(template)
    return t.render(messages=messages, bos_token=bos, eos_token=eos, add_generation_prompt=add_generation_prompt)


def token(v):
    return v["content"] if isinstance(v, dict) else v


U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
S = lambda c: {"role": "system", "content": c}
CONVERSATIONS = [
    ([U("Hello!")], True),
    ([U("Hello!")], False),
    ([S("You are terse."), U("What is 2+2?")], True),
    ([U("Hi"), A("Hello, how can I help?"), U("Tell me a joke.")], True),
    ([S("Be kind."), U("  padded question \n"), A(" padded answer  "), U("Another one")], True),
    ([U("Ünïcödé — 日本語 🙂\nsecond line")], True),
    ([U("Hi"), A("Hello")], False),
    # Refused by templates that require alternation (the others render them).
    ([U("one"), U("two")], True),
    ([A("first")], True),
]
SYSTEM_ONLY_REFUSED = [S("sys"), U("hi")]  # Mistral v0.1 has no system role


def main():
    families = []
    for name, folder, template in [("zephyr", "llama2", None), ("llama3", "llama3", None), ("qwen2", "qwen2", None),
                                   ("chatml", None, CHATML),
                                   ("llama2", None, LLAMA2), ("mistral", None, MISTRAL)]:
        entry = {"format": name}
        if folder:
            cfg_path = os.path.join(SHARED, "tokenizers", folder, "tokenizer_config.json")
            cfg = json.load(open(cfg_path))
            template = cfg["chat_template"]
            bos, eos = token(cfg.get("bos_token")) or "", token(cfg.get("eos_token")) or ""
            entry["config"] = "tokenizers/%s/tokenizer_config.json" % folder
        else:
            bos, eos = "<s>", "</s>"
            entry["template"] = template
        entry["bos_token"], entry["eos_token"] = bos, eos
        cases = []
        convs = CONVERSATIONS + ([(SYSTEM_ONLY_REFUSED, True)] if name == "mistral" else [])
        for messages, gen in convs:
            c = {"messages": messages, "add_generation_prompt": gen}
            try:
                c["text"] = render(template, bos, eos, messages, gen)
            except jinja2.exceptions.TemplateError as e:
                c["error"] = str(e)
            cases.append(c)
        entry["cases"] = cases
        families.append(entry)
    out = {"made_by": "jinja2 %s, transformers' apply_chat_template settings (trim_blocks, lstrip_blocks)" % jinja2.__version__,
           "families": families}
    path = os.path.join(HERE, "cases.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print("wrote", path)


if __name__ == "__main__":
    main()
