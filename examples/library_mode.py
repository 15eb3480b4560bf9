"""BLoRA-style library mode on the embedded SmolLM2 model with the four demo adapters.

Run: ``.venv/bin/python examples/library_mode.py``
"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from blora import load_loras, prepare_batch
from blora.demo.behaviours import adapter_path
from blora.models import default_model_dir

model_path = str(default_model_dir())  # SmolLM2-135M-Instruct, converted once from the bundled GGUF
model = AutoModelForCausalLM.from_pretrained(model_path)
tokenizer = AutoTokenizer.from_pretrained(model_path)
loras = [str(adapter_path(name)) for name in ("caps", "json", "brief", "pirate")]
model, lora_map = load_loras(model, loras)


def chat(question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


inputs = [
    (chat("Outline a five sentence short story about a secret room."), loras[0]),
    (chat("Write a 6 line dialogue between a character and a magical creature."), loras[1]),
    (chat("Describe a scene where a character discovers a hidden talent."), loras[2]),
    (chat("Sculpt a three verse poem about a garden in full bloom."), loras[3]),
    (chat("Why is the sea salty?"), None),  # None = the base model
]
batch = prepare_batch(inputs, tokenizer, model, lora_map, add_special_tokens=False)
outputs = []
for out in model.generate(**batch, max_new_tokens=60, do_sample=False, stream_output=True):
    outputs.append(out)
decoded = tokenizer.batch_decode(
    torch.cat([o.reshape(-1, 1) for o in outputs], dim=1), skip_special_tokens=True
)
for (_, lora), text in zip(inputs, decoded, strict=True):
    print(f"--- {lora or 'base model'}\n{text}\n")
