"""A user's process that has transformers but cannot import `leviathan` or `moe`: it loads
Hugging Face export folders and reports what they compute. The export tests run it as
`python tests/hf_probe.py REQUEST.json` and read the torch file it writes.

The request: {"out": file, "folders": [{"dir", "ids", "prompt", "new", "texts"}]}. Per
folder: the loading info, whether the head is tied, the logits of `ids`, the greedy tokens
of `prompt` generated with the cache (generation_config's default) and without, and the
ids and decoded text of each of `texts` (optional).
"""

import json
import sys


class Refuse:
    """An import hook that fails every import of the project's packages."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("leviathan", "moe"):
            raise ImportError(f"{name}: not importable in this process")
        return None


sys.meta_path.insert(0, Refuse())

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def probe(folder: dict) -> dict:
    model, info = AutoModelForCausalLM.from_pretrained(
        folder["dir"], trust_remote_code=True, output_loading_info=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder["dir"])
    prompt = torch.tensor([folder["prompt"]])
    with torch.no_grad():
        logits = model(torch.tensor(folder["ids"])).logits
    greedy = {"max_new_tokens": folder["new"], "do_sample": False}
    ids = [tokenizer.encode(t) for t in folder.get("texts", [])]
    return {
        "info": {k: sorted(map(str, v)) for k, v in info.items()},
        "tied": model.model.head.weight is model.model.tok_emb.weight,
        "logits": logits,
        "cached": model.generate(prompt, **greedy)[0].tolist(),
        "uncached": model.generate(prompt, use_cache=False, **greedy)[0].tolist(),
        "ids": ids,
        "decoded": [tokenizer.decode(i) for i in ids],
        "eos": tokenizer.eos_token_id,
    }


def main() -> None:
    request = json.loads(open(sys.argv[1], encoding="utf-8").read())
    results = {f["dir"]: probe(f) for f in request["folders"]}
    results["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("leviathan", "moe"))
    torch.save(results, request["out"])


if __name__ == "__main__":
    main()
