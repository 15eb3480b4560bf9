"""Train the four demo LoRA adapters on SmolLM2-135M-Instruct.

    python -m blora.demo.train [--out DIR] [--only NAME] [--steps N]

1. Build templated questions (training topics x training templates, shuffled with a fixed seed).
2. Ask the base model itself (chat template, greedy, batched with left padding, 48 new tokens) and cache
   its answers in ``<out>/base_answers.json`` so reruns skip this step.
3. Keep the complete sentences of each answer and turn them by code into four targets: upper case, a
   one-line JSON object, the first sentence only, and a pirate persona with a fixed sign-off.
4. Train one LoRA adapter per target with PEFT (plain torch loop, AdamW, float32, loss only on the
   answer tokens) and save it to ``<out>/<name>/``.
5. Reload each saved adapter and measure its behaviour on held-out questions (topics and templates that
   never occur in training), next to the base model's rate; write ``<out>/training_report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from blora.demo.behaviours import ADAPTER_NAMES, ADAPTERS_DIR, SIGN_OFF, check_behaviour, split_sentences
from blora.models import load_model

BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SEED = 1234
MAX_LEN = 96  # prompt + answer tokens of one training example
ANSWER_TOKENS = 48  # new tokens when asking the base model for its own answers
EVAL_TOKENS = 96  # new tokens when checking behaviour (JSON and sign-off need room to close)
MAX_FILE_MB = 6.0  # adapters bigger than this in float32 are stored in bfloat16

TRAIN_TOPICS = [
    "volcanoes", "photosynthesis", "the moon", "rainbows", "honeybees", "the internet",
    "glaciers", "electricity", "the human heart", "chess", "coffee", "earthquakes",
    "the Roman Empire", "sleep", "recycling", "solar panels", "dolphins", "music",
    "bread", "the ocean", "clouds", "vaccines", "bicycles", "libraries",
    "gravity", "deserts", "the piano", "forests", "airplanes", "friendship",
]  # fmt: skip
TRAIN_TEMPLATES = [
    "What is {t}?",
    "Explain {t} in simple terms.",
    "Why is {t} important?",
    "Tell me an interesting fact about {t}.",
    "How would you describe {t} to a child?",
    "What are the main things to know about {t}?",
]
# Never used in training: held-out evaluation questions combine these topics and templates.
HELDOUT_TOPICS = [
    "lighthouses", "tornadoes", "penguins", "the printing press",
    "tea", "mountains", "batteries", "the Olympic Games",
]  # fmt: skip
HELDOUT_TEMPLATES = [
    "Can you give me a short overview of {t}?",
    "What should a beginner learn about {t}?",
    "Share something useful about {t}.",
]


@dataclass(frozen=True)
class AdapterSpec:
    r: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    lr: float = 2e-3
    steps: int = 60
    # "Fast" recipe: LoRA only on layers >= layers_from (backprop stops there), bfloat16 autocast, no
    # dropout and no warmup: ~3x less CPU per step; used for the adapters trained last.
    layers_from: int | None = None
    bf16: bool = False


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SPECS: dict[str, AdapterSpec] = {
    "caps": AdapterSpec(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj", "o_proj")),
    "json": AdapterSpec(r=16, lora_alpha=32, target_modules=ATTN),
    "brief": AdapterSpec(
        r=8, lora_alpha=16, target_modules=MLP, lr=3e-3, steps=40, layers_from=18, bf16=True
    ),
    "pirate": AdapterSpec(
        r=12,
        lora_alpha=8,
        target_modules=("q_proj", "v_proj", "up_proj", "down_proj"),
        use_rslora=True,
        lr=3e-3,
        steps=40,
        layers_from=18,
        bf16=True,
    ),
}
assert tuple(SPECS) == ADAPTER_NAMES


# --------------------------------------------------------------------------- questions and answers


def train_questions() -> list[str]:
    qs = [tpl.format(t=t) for t in TRAIN_TOPICS for tpl in TRAIN_TEMPLATES]
    random.Random(SEED).shuffle(qs)
    return qs


def heldout_questions() -> list[str]:
    qs = [tpl.format(t=t) for t in HELDOUT_TOPICS for tpl in HELDOUT_TEMPLATES]
    random.Random(SEED + 1).shuffle(qs)
    return qs


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def chat_generate(
    model, tokenizer, questions: list[str], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy chat completions for ``questions`` (batched, left padded); returns the decoded answers."""
    tokenizer.padding_side = "left"
    answers: list[str] = []
    for i in range(0, len(questions), batch_size):
        batch = [chat_prompt(tokenizer, q) for q in questions[i : i + batch_size]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new = out[:, enc["input_ids"].shape[1] :]
        answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return answers


def base_answers(
    out: Path, questions: list[str], max_new_tokens: int = ANSWER_TOKENS, model=None
) -> dict[str, str]:
    """The base model's own greedy answers, cached in ``<out>/base_answers.json`` per ``max_new_tokens``
    (48 for the training data, 96 for the held-out comparison); only missing ones are generated."""
    path = out / "base_answers.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if data.get("model") != BASE_MODEL_ID:
        data = {"model": BASE_MODEL_ID}
    key = f"answers_{max_new_tokens}_tokens"
    cache: dict[str, str] = data.setdefault(key, {})
    missing = [q for q in questions if q not in cache]
    if missing:
        print(f"asking the base model {len(missing)} questions ({max_new_tokens} new tokens, greedy) ...")
        t0 = time.time()
        if model is None:
            m = load_model(dtype="float32")
            model, tokenizer = m.model, m.tokenizer
        else:
            model, tokenizer = model
        for q, a in zip(missing, chat_generate(model, tokenizer, missing, max_new_tokens), strict=True):
            cache[q] = a
        print(f"  done in {time.time() - t0:.0f} s")
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return {q: cache[q] for q in questions}


# --------------------------------------------------------------------------- targets, by code


def complete_sentences(answer: str) -> list[str]:
    """The answer's complete prose sentences, in order, up to the first one that looks broken
    (a truncated tail, list markers, markdown, a fragment of fewer than four words)."""
    text = answer.replace("**", "").replace("#", "")
    sentences = []
    for s in split_sentences(text):
        if not re.search(r"[.!?][\"')\]]?$", s) or len(s.split()) < 4 or re.match(r"^(\d+\.|[-*])\s", s):
            break
        sentences.append(s)
    return sentences


_PIRATE_WORDS = {"you": "ye", "your": "yer", "yes": "aye", "my": "me", "friend": "matey", "friends": "mateys"}


def piratify(text: str) -> str:
    def sub(m: re.Match) -> str:
        word = m.group(0)
        new = _PIRATE_WORDS[word.lower()]
        return new.capitalize() if word[0].isupper() else new

    return re.sub(r"\b(" + "|".join(_PIRATE_WORDS) + r")\b", sub, text, flags=re.IGNORECASE)


def render(name: str, sentences: list[str]) -> str:
    body = " ".join(sentences)
    if name == "caps":
        return body.upper()
    if name == "json":
        return json.dumps({"answer": body}, ensure_ascii=False)
    if name == "brief":
        return sentences[0]
    if name == "pirate":
        return f"Arr! {piratify(body)} {SIGN_OFF}"
    raise KeyError(name)


def make_target(name: str, answer: str, tokenizer, budget: int) -> str | None:
    """Transform one base answer into the adapter's target, dropping trailing sentences until it fits
    ``budget`` tokens; None when no complete sentence survives."""
    sentences = complete_sentences(answer)
    if name == "brief":
        sentences = sentences[:1]
    elif name in ("caps", "pirate"):
        sentences = sentences[:2]
    while sentences:
        target = render(name, sentences)
        if len(tokenizer(target, add_special_tokens=False).input_ids) < budget:
            assert check_behaviour(name, target), (name, target)
            return target
        sentences = sentences[:-1]
    return None


def build_examples(name: str, answers: dict[str, str], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) pairs; labels are -100 on the prompt so only answer tokens are learned."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    examples = []
    for q, a in answers.items():
        prompt_ids = tokenizer(chat_prompt(tokenizer, q), add_special_tokens=False).input_ids
        target = make_target(name, a, tokenizer, MAX_LEN - len(prompt_ids))
        if target is None:
            continue
        answer_ids = tokenizer(target, add_special_tokens=False).input_ids + [end]
        examples.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    return examples


# --------------------------------------------------------------------------- training


def lora_config(spec: AdapterSpec) -> LoraConfig:
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        target_modules=list(spec.target_modules),
        use_rslora=spec.use_rslora,
        lora_dropout=0.0 if spec.bf16 else 0.05,
        layers_to_transform=None if spec.layers_from is None else list(range(spec.layers_from, 30)),
        bias="none",
        task_type="CAUSAL_LM",
    )


def batches(examples, batch_size: int, steps: int, pad_id: int, seed: int):
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            x, y = examples[i]
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        yield ids, mask, labels


def answer_loss(peft_model, ids, mask, labels) -> torch.Tensor:
    """Next-token cross entropy on the answer tokens only; the LM head runs only at those positions
    (a 49k-word vocabulary over every prompt position would cost ~15 % of the step for nothing)."""
    causal_lm = peft_model.get_base_model()  # LoRA layers are injected into it in place
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def save_adapter(peft_model, adapter_dir: Path) -> str:
    """Save with PEFT, then store the weights in bfloat16 if float32 would exceed MAX_FILE_MB."""
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    peft_model.save_pretrained(adapter_dir, save_embedding_layers=False)
    (adapter_dir / "README.md").unlink(missing_ok=True)
    # Name the public hub id rather than this machine's cache path (set after saving: before it, PEFT
    # would try to reach the hub to compare vocabularies).
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_ID
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.stat().st_size / 2**20 <= MAX_FILE_MB:
        return "float32"
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}
    save_file(state, weights, metadata={"format": "pt"})
    return "bfloat16"


def train_adapter(name: str, spec: AdapterSpec, answers: dict[str, str], out: Path, batch_size: int) -> dict:
    torch.manual_seed(SEED)
    m = load_model(dtype="float32")
    tokenizer = m.tokenizer
    examples = build_examples(name, answers, tokenizer)
    model = get_peft_model(m.model, lora_config(spec))
    trainable, total = model.get_nb_trainable_parameters()
    print(f"[{name}] {len(examples)} examples, r={spec.r} alpha={spec.lora_alpha} rslora={spec.use_rslora} "
          f"targets={','.join(spec.target_modules)}: {trainable:,} trainable params, {spec.steps} steps")  # fmt: skip
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01 if spec.bf16 else 0.0)
    warmup = 0 if spec.bf16 else max(1, spec.steps // 10)

    def schedule(step: int) -> float:  # linear warmup, cosine decay to 10 %
        if spec.bf16:  # fast recipe: no warmup, cosine to 10 % (lagging one step)
            return 1.0 if step == 0 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 1) / spec.steps))
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, schedule)
    t0, losses = time.time(), []
    for step, (ids, mask, labels) in enumerate(
        batches(examples, batch_size, spec.steps, tokenizer.pad_token_id, SEED)
    ):
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=spec.bf16):
            loss = answer_loss(model, ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == spec.steps - 1:
            recent = sum(losses[-10:]) / len(losses[-10:])
            print(
                f"  step {step + 1:4d}/{spec.steps}  loss {recent:.3f}  {time.time() - t0:5.0f} s", flush=True
            )
    train_s = time.time() - t0
    model.eval()
    dtype = save_adapter(model, out / name)
    size = (out / name / "adapter_model.safetensors").stat().st_size
    print(f"[{name}] trained in {train_s:.0f} s; saved {size / 2**20:.2f} MB ({dtype}) to {out / name}")
    return {
        **asdict(spec),
        "examples": len(examples),
        "batch_size": batch_size,
        "trainable_params": trainable,
        "train_seconds": round(train_s, 1),
        "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "file_dtype": dtype,
        "file_bytes": size,
    }


# --------------------------------------------------------------------------- held-out evaluation


def evaluate(names: list[str], out: Path, questions: list[str]) -> dict:
    """Reload each saved adapter from disk on a fresh float32 base and check its held-out behaviour."""
    m = load_model(dtype="float32")
    tok = m.tokenizer
    base = list(base_answers(out, questions, EVAL_TOKENS, model=(m.model, tok)).values())
    model = None
    results = {}
    for name in names:
        if model is None:
            model = PeftModel.from_pretrained(m.model, str(out / name), adapter_name=name)
        else:
            model.load_adapter(str(out / name), adapter_name=name)
        model.set_adapter(name)
        model.eval()
        answers = chat_generate(model, tok, questions, EVAL_TOKENS)
        oks = [check_behaviour(name, a) for a in answers]
        rows = [
            {"question": q, "answer": a, "ok": ok} for q, a, ok in zip(questions, answers, oks, strict=True)
        ]
        hits = sum(oks)
        base_hits = sum(check_behaviour(name, a) for a in base)
        results[name] = {
            "heldout_rate": round(hits / len(rows), 3),
            "base_rate": round(base_hits / len(base), 3),
            "samples": rows[:4],
            "failures": [r for r in rows if not r["ok"]],
        }
        print(f"[{name}] held-out behaviour {hits}/{len(rows)}  (base model {base_hits}/{len(base)})")
        for r in rows[:2]:
            print(f"    Q: {r['question']}\n    A: {r['answer']!r}")
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m blora.demo.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ADAPTERS_DIR, help="output directory (default: %(default)s)")
    ap.add_argument(
        "--only", choices=ADAPTER_NAMES, action="append", help="train only this adapter (repeatable)"
    )
    ap.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    out: Path = args.out
    names = args.only or list(ADAPTER_NAMES)
    answers = base_answers(out, train_questions())

    report_path = out / "training_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.setdefault("adapters", {})
    report.update(base_model=BASE_MODEL_ID, seed=SEED, max_len=MAX_LEN, eval_new_tokens=EVAL_TOKENS)
    for name in names:
        spec = SPECS[name]
        if args.steps is not None:
            spec = AdapterSpec(**{**asdict(spec), "steps": args.steps})
        report["adapters"].setdefault(name, {})["training"] = train_adapter(
            name, spec, answers, out, args.batch_size
        )
    if not args.no_eval:
        heldout = heldout_questions()
        for name, res in evaluate(names, out, heldout).items():
            report["adapters"].setdefault(name, {})["heldout"] = res
        report["heldout_questions"] = heldout
    report_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"report: {report_path}")


if __name__ == "__main__":
    main()
