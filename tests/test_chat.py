"""Chat rendering: ids equal `transformers`' apply_chat_template (lmlab's ChatML and other
templates), the assistant mask covers each answer and its end of turn, ChatML tokens are
added to a tokenizer without a template, and conversation files fail with `path:line`."""

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmlab.data.chat import (as_messages, ensure_chat_tokens, load_conversations, prompt_ids,
                             render_chat)
from lmlab.errors import InputError
from lmlab.model import Transformer, preset
from lmlab.tokenizer import IM_END, Tokenizer, train_tokenizer

LINES = [f"第{i}个问题：{a}加{b}等于几？答案是{a + b}。Question {i}: what is {a} plus {b}?"
         for i, (a, b) in enumerate((x, y) for x in range(20) for y in range(15))]

CONVERSATION = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "2加3等于几？"},
    {"role": "assistant", "content": "答案是5。"},
    {"role": "user", "content": "What is 4 plus 4?"},
    {"role": "assistant", "content": "It is 8."},
]

LLAMA2 = (  # Llama 2 chat's template: bos/eos as variables, a system prompt folded in
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

ZEPHYR = (  # Zephyr / TinyLlama chat, with its role markers as special tokens
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("chatml")
    train_tokenizer(LINES, vocab_size=400).save(out)
    return out


def hf_style_dir(out, template=None, specials=("<s>", "</s>", "<unk>"), **names):
    """A tokenizer directory as `transformers` saves one (a byte-level BPE of its own,
    the template in chat_template.jinja), not made by lmlab."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LINES, trainers.BpeTrainer(
        vocab_size=360, special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **names
                            ).save_pretrained(out)
    return out


def reference(tokenizer_dir, messages, **kw):
    ids = AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(
        messages, tokenize=True, return_dict=False, **kw)
    return list(ids)


def trained_text(tok, ids, mask):
    """The decoded runs of masked tokens, one string per run."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def test_chatml_ids_equal_transformers_and_mask_covers_answers_and_end_of_turn(chatml_dir):
    tok = Tokenizer.load(chatml_dir)
    ids, mask = render_chat(tok, CONVERSATION)
    assert ids == reference(chatml_dir, CONVERSATION)
    assert len(mask) == len(ids)
    # each answer, its <|im_end|> and the template's "\n" after it: nothing else
    assert trained_text(tok, ids, mask) == ["答案是5。<|im_end|>\n", "It is 8.<|im_end|>\n"]
    assert prompt_ids(tok, CONVERSATION[:4]) == reference(chatml_dir, CONVERSATION[:4],
                                                          add_generation_prompt=True)
    assert tok.decode(prompt_ids(tok, CONVERSATION[:2])).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("template, specials, names, answers", [
    (LLAMA2, ("<s>", "</s>", "<unk>"), dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
     [" 答案是5。 </s>", " It is 8. </s>"]),
    (ZEPHYR, ("</s>", "<|user|>", "<|system|>", "<|assistant|>"), dict(eos_token="</s>"),
     ["答案是5。</s>\n", "It is 8.</s>\n"]),
])
def test_other_templates_render_as_transformers_does(tmp_path, template, specials, names, answers):
    d = hf_style_dir(tmp_path / "tok", template, specials, **names)
    assert (d / "chat_template.jinja").is_file()  # transformers 5 keeps it apart
    tok = Tokenizer.load(d)
    ids, mask = render_chat(tok, CONVERSATION)
    assert ids == reference(d, CONVERSATION)
    assert trained_text(tok, ids, mask) == answers
    assert prompt_ids(tok, CONVERSATION[:2]) == reference(d, CONVERSATION[:2],
                                                          add_generation_prompt=True)


def test_a_template_that_does_not_split_cleanly_or_refuses_is_one_error(tmp_path):
    d = hf_style_dir(tmp_path / "llama", LLAMA2, bos_token="<s>", eos_token="</s>",
                     unk_token="<unk>")
    with pytest.raises(InputError, match="refuses this conversation .*must alternate"):
        render_chat(Tokenizer.load(d), CONVERSATION[:2] + CONVERSATION[3:4], where="f.jsonl:3")
    # a template that rewrites earlier answers: their tokens cannot be told apart
    rewrites = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                "{{ 'A: (earlier)</s>' }}{% else %}{{ m['role'][0] + ': ' + m['content'] + "
                "'</s>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
    d2 = hf_style_dir(tmp_path / "rw", rewrites, eos_token="</s>")
    with pytest.raises(InputError, match="f.jsonl:3: .*does not render message 3 as a prefix"):
        render_chat(Tokenizer.load(d2), CONVERSATION, where="f.jsonl:3")


@pytest.mark.parametrize("tie", [True, False])
def test_ensure_chat_tokens_adds_chatml_and_grows_the_model(tmp_path, tie):
    d = hf_style_dir(tmp_path / "gpt2", None, ("<|endoftext|>",), bos_token="<|endoftext|>",
                     eos_token="<|endoftext|>")
    base = Tokenizer.load(d)
    assert base.chat_template is None
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=base.vocab_size, tie_embeddings=tie))
    old_emb, old_head = model.tok_emb.weight.detach().clone(), model.lm_head.weight.detach().clone()
    x = torch.tensor([base.encode("第3个问题：3加4等于几？")])
    with torch.no_grad():
        old_logits = model(x)
    tok = ensure_chat_tokens(base, model)
    V = base.vocab_size
    assert tok.vocab_size == V + 2 == model.vocab_size == model.tok_emb.weight.shape[0]
    assert model.lm_head.weight.shape[0] == V + 2
    assert (model.lm_head.weight is model.tok_emb.weight) == tie
    assert torch.equal(model.tok_emb.weight[:V], old_emb)
    assert torch.allclose(model.tok_emb.weight[V:], old_emb.mean(0).expand(2, -1))
    assert torch.allclose(model.lm_head.weight[V:], old_head.mean(0).expand(2, -1))
    with torch.no_grad():
        new_logits = model(x)
    # the old tokens' outputs unchanged (up to the rounding of a wider product)
    assert torch.allclose(new_logits[..., :V], old_logits, atol=1e-6, rtol=0)
    assert tok.eot_id == tok.token_id(IM_END) and tok.eot_id in tok.stop_ids
    assert tok.eos_id == base.eos_id
    # saved, it renders as transformers renders it, and keeps its stop ids
    tok.save(tmp_path / "chat")
    again = Tokenizer.load(tmp_path / "chat")
    assert render_chat(again, CONVERSATION)[0] == reference(tmp_path / "chat", CONVERSATION)
    assert again.stop_ids == tok.stop_ids
    # a tokenizer with a template is left alone
    assert ensure_chat_tokens(again, model) is again and model.vocab_size == V + 2


def test_three_formats_and_bad_lines(tmp_path):
    f = tmp_path / "chats.jsonl"
    rows = [{"messages": CONVERSATION},
            {"prompt": "你好", "response": "你好！", "system": "简短回答"},
            {"instruction": "翻译成英文", "input": "猫", "output": "cat"},
            {"instruction": "说一个数", "input": "", "output": "7"}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    convs = load_conversations(f)
    assert convs[0] == CONVERSATION
    assert convs[1] == [{"role": "system", "content": "简短回答"},
                        {"role": "user", "content": "你好"},
                        {"role": "assistant", "content": "你好！"}]
    assert convs[2][0] == {"role": "user", "content": "翻译成英文\n\n猫"}
    assert convs[3] == [{"role": "user", "content": "说一个数"},
                        {"role": "assistant", "content": "7"}]
    bad = {
        '{"messages": [{"role": "user", "content": "hi"}]}': "no assistant turn",
        '{"messages": [{"role": "bot", "content": "hi"}]}': "message 1 has role 'bot'",
        '{"question": "hi", "answer": "yo"}': "none of the formats",
        '{"messages": [': "not JSON",
        '["prompt", "response"]': "a JSON list, not an object",
        '{"prompt": "hi", "response": "  "}': "message 2 \\(assistant\\) is empty",
    }
    for line, why in bad.items():
        f.write_text(json.dumps(rows[1], ensure_ascii=False) + "\n\n" + line + "\n")
        with pytest.raises(InputError, match=f"{f}:3: {why}"):
            load_conversations(f)


def test_as_messages():
    assert as_messages("你好") == [{"role": "user", "content": "你好"}]
    assert as_messages("你好", "简短回答")[0] == {"role": "system", "content": "简短回答"}
    assert as_messages(CONVERSATION[1:3], "s")[0]["role"] == "system"
    with pytest.raises(InputError, match="role 'robot'"):
        as_messages([{"role": "robot", "content": "x"}])
