"""A small byte-level BPE in the DeepSeek V4 tokenizer.json format.

Normaliser, pre-tokeniser (three Split regexes + ByteLevel), post-processor and
decoder are copied from the official-format fixture tokenizer
(../../shared/fixtures/tiny-hf/hf/tokenizer.json); only the vocabulary and the
merges are learned here, with the `tokenizers` BPE trainer on the demo corpus.
Ids are laid out like the fixtures: 0 BOS, 1 EOS (special), 2..257 the 256
bytes (byte b -> id 2+b, GPT-2 byte-to-unicode form), 258..262 `<｜User｜>`
`<｜Assistant｜>` `<think>` `</think>` `｜DSML｜` (added, not special, as in the
official file), then one token per learned merge in merge order.
"""

import json
import re

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
ADDED = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜"]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train(docs, template_path, vocab_size, out_path):
    tmpl = json.load(open(template_path, encoding="utf-8"))
    strip = re.compile("|".join(re.escape(t) for t in [BOS, EOS] + ADDED))
    texts = [strip.sub("\n", d) for d in docs]
    # a throwaway tokenizer with the official pre-tokeniser, only to learn merges
    tok = Tokenizer.from_str(json.dumps({**tmpl, "added_tokens": [], "model": {"type": "BPE", "vocab": {}, "merges": []}}))
    n_fixed = 2 + 256 + len(ADDED)
    trainer = trainers.BpeTrainer(vocab_size=256 + (vocab_size - n_fixed), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    learned = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in learned]
    b2u = bytes_to_unicode()
    vocab = {BOS: 0, EOS: 1}
    for b in range(256):
        vocab[b2u[b]] = 2 + b
    for i, t in enumerate(ADDED):
        vocab[t] = 258 + i
    kept = []
    for m in merges:
        left, right = m.split(" ")
        if left + right in vocab:
            continue
        vocab[left + right] = len(vocab)
        kept.append(m)
    added = [{"id": 0, "content": BOS, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True},
             {"id": 1, "content": EOS, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}]
    added += [{"id": 258 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
              for i, t in enumerate(ADDED)]
    out = dict(tmpl)
    out["added_tokens"] = added
    out["model"] = {**tmpl["model"], "vocab": vocab, "merges": kept}
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    return Tokenizer.from_file(out_path), len(vocab)
