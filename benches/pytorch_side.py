#!/usr/bin/env python3
"""The PyTorch side of benches/compare.sh: the seed's own recipe (Hugging Face `transformers`
BLIP on PyTorch, f32, CPU) timed on the same operations and inputs as
examples/bench_compare.rs. Prints one JSON object per line, in the same format.

Operations (see examples/bench_compare.rs for the Rust twin):
  image_b1, image_b8  BlipImageProcessor (PIL backend) + vision_model + vision_proj + normalize
  text_query          BLIP's text cleaning + tokenizer + text_encoder + text_proj + normalize
  itm                 one 35-token text ([ENC] first) against 8 stored ViT outputs + itm_head
  caption             processor + BlipForConditionalGeneration.generate(beam 3, max 20, min 5,
                      prompt "a picture of ")
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from transformers import (  # noqa: E402
    BertTokenizerFast,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
)

try:  # transformers 5: the PIL backend is the classic BlipImageProcessor (bicubic on uint8)
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil as BlipImageProcessor
except ImportError:  # transformers 4.x
    from transformers import BlipImageProcessor  # type: ignore

# Keep in step with examples/bench_compare.rs.
QUERY = "a dog playing on the beach"
LONG_TEXT = (
    "a man in a red jacket riding a bicycle down a busy city street next to a yellow taxi while "
    "people walk past brightly lit shops and a small dog watches them from the corner of a bakery"
)
ENC_ID = 30523
MAX_TEXT_LEN = 35
PROMPT = "a picture of "


def pre_caption(text: str) -> str:
    """BLIP's text cleaning (salesforce/BLIP data/utils.py), as the Rust tokenizer applies it."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text)
    return text.rstrip("\n").strip(" ")


def load_photo(path: str) -> Image.Image:
    im = Image.open(path)
    im.load()
    return ImageOps.exif_transpose(im)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--retrieval", required=True)
    ap.add_argument("--caption", required=True)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ops", default="image_b1,image_b8,text_query,itm,caption")
    ap.add_argument("images", nargs="+")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)

    t = time.perf_counter()
    retr = BlipForImageTextRetrieval.from_pretrained(a.retrieval).eval()
    capm = BlipForConditionalGeneration.from_pretrained(a.caption).eval()
    tok = BertTokenizerFast.from_pretrained(a.retrieval)
    load_s = time.perf_counter() - t
    size = retr.config.vision_config.image_size
    proc = BlipImageProcessor(size={"height": size, "width": size})
    photos = [load_photo(p) for p in a.images]

    def batch(n):
        return [photos[i % len(photos)] for i in range(n)]

    b1, b8 = batch(1), batch(8)

    def embed_images(imgs):
        pv = proc(images=imgs, return_tensors="pt")["pixel_values"]
        vlh = retr.vision_model(pixel_values=pv)[0]
        return F.normalize(retr.vision_proj(vlh[:, 0, :]), dim=-1), vlh

    def tokenize(texts):
        enc = tok([pre_caption(s) for s in texts], padding="longest", truncation=True,
                  max_length=MAX_TEXT_LEN, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    _, stored = embed_images(b8)  # stored image features for ITM, outside the timing
    stored_mask = torch.ones(stored.shape[:-1], dtype=torch.long)
    query_tokens = tokenize([QUERY])[0].shape[1]
    itm_tokens = tokenize([LONG_TEXT])[0].shape[1]
    prompt_ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    prompt_len = prompt_ids.shape[1] - 1  # generate swaps [CLS] for [DEC] and drops [SEP]

    def op_image(imgs):
        embed_images(imgs)
        return {}

    def op_text():
        ids, mask = tokenize([QUERY])
        h = retr.text_encoder(input_ids=ids, attention_mask=mask)[0]
        F.normalize(retr.text_proj(h[:, 0, :]), dim=-1)
        return {}

    def op_itm():
        ids, mask = tokenize([LONG_TEXT] * stored.shape[0])
        ids[:, 0] = ENC_ID
        h = retr.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=stored,
                              encoder_attention_mask=stored_mask)[0]
        p = torch.softmax(retr.itm_head(h[:, 0, :]), dim=-1)[:, 1]
        return {"p_match": p.tolist()}

    def op_caption():
        pv = proc(images=b1, return_tensors="pt")["pixel_values"]
        out = capm.generate(pixel_values=pv, input_ids=prompt_ids.clone(), num_beams=3, max_length=20,
                            min_length=5, do_sample=False)
        seq = out[0].tolist()
        return {"tokens": len(seq) - prompt_len, "text": tok.decode(seq, skip_special_tokens=True)}

    ops = {
        "image_b1": (1, "images/s", lambda: op_image(b1)),
        "image_b8": (8, "images/s", lambda: op_image(b8)),
        "text_query": (1, "queries/s", op_text),
        "itm": (8, "pairs/s", op_itm),
        "caption": (1, "s/caption", op_caption),
    }
    selected = a.ops.split(",")
    unknown = [s for s in selected if s not in ops]
    if unknown:
        ap.error(f"unknown operation(s) {unknown}")
    print(json.dumps({"side": "pytorch", "kind": "info", "threads": torch.get_num_threads(), "load_s": load_s,
                      "query_tokens": query_tokens, "itm_tokens": itm_tokens,
                      "torch": torch.__version__, "mkldnn": torch.backends.mkldnn.is_available()}), flush=True)
    for name in selected:  # warm-up
        ops[name][2]()
    for name in selected:
        items, unit, fn = ops[name]
        samples, extra = [], {}
        for _ in range(a.iters):
            t = time.perf_counter()
            extra = fn()
            samples.append(time.perf_counter() - t)
        print(json.dumps({"side": "pytorch", "kind": "op", "op": name, "items": items, "unit": unit,
                          "seconds": samples, "extra": extra}), flush=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    print(json.dumps({"side": "pytorch", "kind": "memory", "peak_rss_mib": peak_mib}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
