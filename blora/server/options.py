"""``blora serve``'s options: the argument parser, their checks, and what they turn into.

One place for every entry point: ``blora serve`` (``blora.cli``), ``python -m blora.server``
(``blora.server.cli``) and ``blora serve --ray`` / ``serve run blora.ray:app_builder`` (``blora.ray.app``)
parse with ``add_serve_arguments``, refuse inconsistent options with ``check_args`` before anything loads,
and build the engine from ``engine_args`` (an ``EngineArgs``: the model's source and an ``EngineConfig``)
and the HTTP layer from ``server_config`` (a ``ServerConfig``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blora.engine.llm_engine import EngineConfig
    from blora.server.app import ServerConfig

# vLLM options blora does not implement, with why; ``blora serve`` exits naming them instead of argparse's
# "unrecognized arguments" (a vLLM user learns it is known, and what to do instead).
UNSUPPORTED_VLLM_FLAGS: dict[str, str] = {
    "--tensor-parallel-size": "one process serves one device; scale out with --ray --replicas N",
    "--pipeline-parallel-size": "one process serves one device; scale out with --ray --replicas N",
    "--data-parallel-size": "scale out with --ray --replicas N",
    "--distributed-executor-backend": "scale out with --ray --replicas N",
    "--gpu-memory-utilization": "the KV cache is sized from free memory; set --num-kv-blocks to fix it",
    "--swap-space": "preempted requests are recomputed, never swapped",
    "--cpu-offload-gb": "weights stay on the device",
    "--kv-cache-dtype": "the KV cache has the model's dtype (--dtype)",
    "--load-format": "models load from Hugging Face directories, hub ids in the local cache, or .gguf",
    "--tokenizer-mode": "the Hugging Face tokenizer of --tokenizer (or the model) is always used",
    "--enforce-eager": "blora always runs eagerly (no CUDA graphs to disable)",
    "--max-seq-len-to-capture": "blora does not capture CUDA graphs",
    "--speculative-config": "speculative decoding is not implemented",
    "--num-scheduler-steps": "one scheduler step per forward",
    "--enable-chunked-prefill": "prefill is always chunked by --max-num-batched-tokens",
    "--lora-dtype": "adapters are kept in the model's dtype",
    "--lora-extra-vocab-size": "adapters with extra vocabulary are not supported",
    "--long-lora-scaling-factors": "long-context LoRA is not supported",
    "--fully-sharded-loras": "no tensor parallelism, so nothing to shard",
    "--max-prompt-adapters": "prompt adapters are not supported",
    "--enable-prompt-adapter": "prompt adapters are not supported",
    "--limit-mm-per-prompt": "multimodal inputs are not supported",
    "--mm-processor-kwargs": "multimodal inputs are not supported",
    "--task": "blora serves text generation only",
    "--hf-overrides": "the model's config is used as saved",
    "--rope-scaling": "the model's config is used as saved",
    "--reasoning-parser": "reasoning parsers are not implemented",
    "--guided-decoding-backend": "not configurable",
    "--disable-custom-all-reduce": "no tensor parallelism",
    "--response-role": "the assistant role is always 'assistant'",
    "--return-tokens-as-token-ids": "not implemented",
    "--uvicorn-log-level": "use --log-level",
    "--max-log-len": "requests are logged without their prompts (--enable-log-requests)",
    "--code-revision": "remote code is loaded at --revision",
    "--tokenizer-revision": "the tokenizer is loaded at --revision",
    "--chat-template-content-format": "message content parts are always joined into one string",
}


class LoRAModule(tuple):
    """One ``--lora-modules`` entry: ``name=path`` or vLLM's JSON ``{"name", "path", "base_model_name"}``.
    A ``(name, path)`` pair (so ``dict(modules)`` works) with ``base_model_name`` beside it."""

    base_model_name: str | None

    def __new__(cls, name: str, path: str, base_model_name: str | None = None) -> LoRAModule:
        module = super().__new__(cls, (name, path))
        module.base_model_name = base_model_name
        return module

    @property
    def name(self) -> str:
        return self[0]

    @property
    def path(self) -> str:
        return self[1]


def _lora_module(spec: str) -> LoRAModule:
    if spec.lstrip().startswith("{"):
        try:
            data = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"--lora-modules: invalid JSON {spec!r}: {exc}") from None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("name"), str)
            or not isinstance(data.get("path"), str)
        ):
            raise argparse.ArgumentTypeError(
                f'--lora-modules JSON needs string "name" and "path" (and optionally "base_model_name"), '
                f"got {spec!r}"
            )
        unknown = sorted(set(data) - {"name", "path", "base_model_name"})
        if unknown:
            raise argparse.ArgumentTypeError(f"--lora-modules JSON has unknown keys {unknown} in {spec!r}")
        base = data.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise argparse.ArgumentTypeError(
                f'--lora-modules: "base_model_name" must be a string in {spec!r}'
            )
        if not data["name"] or not data["path"]:
            raise argparse.ArgumentTypeError(f'--lora-modules: empty "name" or "path" in {spec!r}')
        return LoRAModule(data["name"], data["path"], base)
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f'--lora-modules expects name=path or {{"name": ..., "path": ...}}, got {spec!r}'
        )
    return LoRAModule(name, path)


def _origins(spec: str) -> list[str]:
    """``--allowed-origins``: vLLM's JSON list (``'["*"]'``) or comma-separated origins."""
    try:
        value = json.loads(spec)
    except json.JSONDecodeError:
        value = [o.strip() for o in spec.split(",") if o.strip()]
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise argparse.ArgumentTypeError(
            f"expected a JSON list of strings or comma-separated values, got {spec!r}"
        )
    return value


class _Unsupported(argparse.Action):
    """A vLLM option blora knows and does not implement: exit with why."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        why = UNSUPPORTED_VLLM_FLAGS.get(option_string or "", "not implemented")
        parser.error(
            f"{option_string} is a vLLM option that blora does not implement: {why}. "
            "Remove it (see `blora serve --help`)."
        )


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``serve`` options to ``parser`` (a sub-command parser of ``blora``)."""
    from blora.engine.llm_engine import EngineConfig  # the one set of engine defaults

    a = parser.add_argument
    a(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model, as vLLM's `serve MODEL` (or --model)",
    )
    a(
        "--model",
        default=None,
        help="HF directory, hub id or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    a("--served-model-name", nargs="+", default=None, metavar="NAME",
      help="model id(s) clients use for the base model; the first is the one reported (default: --model)")  # fmt: skip
    a("--tokenizer", default=None, help="tokenizer directory or hub id (default: the model's)")
    a(
        "--revision",
        default=None,
        help="model revision (branch, tag or commit) of a hub id in the local cache",
    )
    a("--trust-remote-code", action="store_true", help="allow the model's own code from its repository")
    a("--chat-template", default=None,
      help="chat template replacing the tokenizer's: a file path or the Jinja template itself")  # fmt: skip
    a("--generation-config", default="auto",
      help="request defaults (temperature, top_p, top_k, min_p, repetition_penalty, max_tokens): 'auto' "
           "from the model's generation_config.json, 'vllm' none, or a directory holding one")  # fmt: skip
    a("--enable-lora", action="store_true",
      help="accepted for vLLM compatibility and changes nothing: adapters are always enabled")  # fmt: skip
    a("--lora-modules", nargs="+", type=_lora_module, default=[], metavar="NAME=PATH|JSON",
      help='adapters to serve from startup, as name=path or \'{"name": ..., "path": ..., '
           '"base_model_name": ...}\'; each name becomes a model id')  # fmt: skip
    a("--max-cpu-loras", type=int, default=None,
      help="adapters kept prepared in host memory (LRU beyond; at least --max-loras)")  # fmt: skip
    a("--adapter-root", type=Path, default=None, help="directory that runtime-loaded adapters must live in")
    a("--allow-runtime-adapters", action="store_true",
      help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter, and serve a request for an "
           "unknown model by loading the adapter of that name under --adapter-root (needs --adapter-root)")  # fmt: skip
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8000)
    a(
        "--api-key",
        default=os.environ.get("BLORA_API_KEY"),
        help="require 'Authorization: Bearer KEY' (env BLORA_API_KEY)",
    )
    a("--max-loras", type=int, default=EngineConfig.max_loras, help="distinct adapters in one engine step")
    a("--max-lora-rank", type=int, default=None,
      help="refuse adapters of a higher rank (checked on adapter_config.json, before the weights are read)")  # fmt: skip
    a("--quantization", choices=["int8", "int4"], default=None,
      help="weight-only quantized base linears on CPU (adapters stay in --dtype); see docs/engine.md")  # fmt: skip
    a("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs, help="sequences in the running batch")
    a(
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + output tokens per request (default: the model's)",
    )
    a("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
      help="tokens per engine step (prefill chunk)")  # fmt: skip
    a("--num-kv-blocks", type=int, default=None, help="KV-cache size in blocks (default: sized from memory)")
    a("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
      help="reuse the KV cache of full prompt blocks of earlier requests with the same tokens and the same "
           "adapter (default: on; --no-enable-prefix-caching or --no-prefix-caching turns it off)")  # fmt: skip
    a("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", help=argparse.SUPPRESS)
    a("--stream-interval", type=int, default=EngineConfig.stream_interval,
      help="new tokens per streamed chunk; the first token and the end are sent at once (default: 1, every "
           "token; larger values cost the server less per token at the price of a burstier stream)")  # fmt: skip
    a("--seed", type=int, default=EngineConfig.seed, help="engine seed for requests without their own seed")
    a("--lora-backend", default=EngineConfig.lora_backend,
      help="how the LoRA math runs: auto | cpu (C++ kernel + GEMMs) | torch (PyTorch ops) (default: auto)")  # fmt: skip
    a("--fast-path", choices=("auto", "on", "off"), default=EngineConfig.fast_path,
      help="the engine's own forward for Llama-family models: auto (where it is faster: CPU with AVX-512), "
           "on (on any CPU the kernels build for), off (transformers' modules)")  # fmt: skip
    a("--cpu-kernel", action=argparse.BooleanOptionalAction, default=EngineConfig.cpu_kernel,
      help="the C++ CPU kernels (LoRA, decode attention, fast path); --no-cpu-kernel: PyTorch ops only")  # fmt: skip
    a("--packed-weights", action=argparse.BooleanOptionalAction, default=EngineConfig.packed_weights,
      help="oneDNN-prepacked weights on the fast path (a second copy of the linear weights)")  # fmt: skip
    a("--max-queue", type=int, default=256,
      help="requests that may wait beyond --max-num-seqs before new ones get 429 (-1: unbounded)")  # fmt: skip
    a("--retry-after", type=int, default=1, help="Retry-After seconds sent with 429")
    a("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests")
    a("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (larger: 413)")
    a("--max-prompt-chars", type=int, default=None,
      help="longest prompt (or chat messages) in characters, checked before tokenization "
           "(default: --max-model-len x the tokenizer's longest token)")  # fmt: skip
    a("--disable-docs", action="store_true",
      help="remove /docs, /redoc and /openapi.json (otherwise public without --api-key, behind it with one)")  # fmt: skip
    a("--dtype", default=None, help="float32 | bfloat16 | float16 (default: per device)")
    a("--device", default=None, help="cpu | cuda | mps (default: best available)")
    a("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a("--engine-process", choices=("auto", "on", "off"), default="auto",
      help="run the engine in a process of its own (on), so HTTP and the engine never wait for each other's "
           "GIL, or in the server's process (off); auto (default): its own process on a GPU or when "
           "--threads leaves a CPU core for the server, else one process (with the engine on every core the "
           "two measure the same under load, and one process is ~5% faster for a single stream and ~0.3 GB "
           "smaller). Ray replicas are processes of their own either way")  # fmt: skip
    a("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    a("--enable-log-requests", action="store_true", help="log one line per request (id, model, sizes)")
    a("--disable-log-requests", action="store_true", help="do not log requests (the default)")
    a("--enable-request-id-headers", action="store_true",
      help="accepted for vLLM compatibility: X-Request-Id is always honoured and sent back")  # fmt: skip
    a("--metrics-names", default="both", choices=["both", "vllm", "blora"],
      help="prefixes of /metrics: vLLM's names as vllm:, blora:, or both")  # fmt: skip
    _add_http_arguments(parser)
    _add_ray_arguments(parser)
    for flag in UNSUPPORTED_VLLM_FLAGS:
        if flag not in parser._option_string_actions:
            a(flag, action=_Unsupported)
    return parser


def _add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """HTTP options with vLLM's names: CORS, TLS, and a proxy's path prefix."""
    g = parser.add_argument_group("HTTP")
    g.add_argument("--allowed-origins", type=_origins, default=None,
                   help='CORS origins, \'["*"]\' or a,b (default: no CORS headers)')  # fmt: skip
    g.add_argument(
        "--allowed-methods", type=_origins, default=["*"], help="CORS methods (with --allowed-origins)"
    )
    g.add_argument(
        "--allowed-headers", type=_origins, default=["*"], help="CORS headers (with --allowed-origins)"
    )
    g.add_argument(
        "--allow-credentials", action="store_true", help="CORS credentials (with --allowed-origins)"
    )
    g.add_argument(
        "--ssl-keyfile", default=None, help="serve HTTPS with this private key (and --ssl-certfile)"
    )
    g.add_argument(
        "--ssl-certfile", default=None, help="serve HTTPS with this certificate (and --ssl-keyfile)"
    )
    g.add_argument("--ssl-ca-certs", default=None, help="CA certificates file (for client certificates)")
    g.add_argument(
        "--root-path", default="", help="path prefix when behind a proxy that strips it (ASGI root_path)"
    )


def _add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray``: N engine replicas behind one ingress on Ray Serve (``blora.ray``; ``blora[ray]`` extra)."""
    g = parser.add_argument_group("Ray Serve scale-out (pip install 'blora[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve from engine replicas on a Ray cluster, routed by adapter (see blora.ray)")  # fmt: skip
    g.add_argument("--replicas", type=int, default=None, help="engine replicas (default 2)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (HOST:6379 or auto); default: start a local one")  # fmt: skip
    g.add_argument("--max-adapters-per-replica", type=int, default=None,
                   help="adapters resident in one replica, LRU beyond (default: --max-loras)")  # fmt: skip
    g.add_argument("--replica-cpus", type=float, default=None, help="Ray CPUs per replica (default 1)")
    g.add_argument("--replica-gpus", type=float, default=None, help="Ray GPUs per replica (default 0)")
    g.add_argument("--no-adapter-affinity", action="store_true",
                   help="route with Ray's default policy instead of by adapter (for comparison)")  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    """Refuse inconsistent options before anything loads; normalizes ``model``, ``chat_template`` and
    ``served_model_name`` (a list) in place."""
    tag = getattr(args, "model_tag", None)
    if tag is not None and args.model is not None and tag != args.model:
        raise SystemExit(f"the model is given twice: {tag!r} (positional) and --model {args.model!r}")
    args.model = args.model or tag
    if isinstance(args.served_model_name, str):
        args.served_model_name = [args.served_model_name]
    if args.allow_runtime_adapters and args.adapter_root is None:
        raise SystemExit("--allow-runtime-adapters needs --adapter-root DIR")
    if args.adapter_root is not None and not args.adapter_root.is_dir():
        raise SystemExit(f"--adapter-root {args.adapter_root} is not a directory")
    names = [m.name for m in args.lora_modules]
    if len(set(names)) != len(names):
        raise SystemExit(f"--lora-modules has duplicate names: {names}")
    _check_lora_bases(args)
    ray_only = ["replicas", "ray_address", "max_adapters_per_replica", "replica_cpus", "replica_gpus"]
    given = [f"--{k.replace('_', '-')}" for k in ray_only if getattr(args, k, None) is not None]
    if getattr(args, "no_adapter_affinity", False):
        given.append("--no-adapter-affinity")
    if given and not getattr(args, "ray", False):
        raise SystemExit(f"{', '.join(given)} only apply with --ray")
    if getattr(args, "ray", False) and args.engine_process != "auto":
        raise SystemExit(
            f"--engine-process {args.engine_process}: Ray replicas run their engines in processes of their own; "
            "the flag applies to a single server"
        )
    if args.stream_interval < 1:
        raise SystemExit(
            f"--stream-interval must be >= 1 (new tokens per streamed chunk), got {args.stream_interval}"
        )
    if args.max_body_mb <= 0 or (args.max_prompt_chars is not None and args.max_prompt_chars < 1):
        raise SystemExit("--max-body-mb and --max-prompt-chars must be positive")
    if getattr(args, "replicas", None) is not None and args.replicas < 1:
        raise SystemExit(f"--replicas must be >= 1, got {args.replicas}")
    if args.max_cpu_loras is not None and args.max_cpu_loras < args.max_loras:
        raise SystemExit(
            f"--max-cpu-loras ({args.max_cpu_loras}) must be at least --max-loras ({args.max_loras})"
        )
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise SystemExit("--ssl-keyfile and --ssl-certfile go together")
    for flag in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            raise SystemExit(f"--{flag.replace('_', '-')} {value} is not a file")
    if args.root_path and not args.root_path.startswith("/"):
        raise SystemExit(f"--root-path must start with '/', got {args.root_path!r}")
    args.chat_template = load_chat_template(args.chat_template)
    generation_defaults(args.generation_config, None)  # 'auto' is read once the model is known


def _check_lora_bases(args: argparse.Namespace) -> None:
    """vLLM's ``base_model_name`` must name the model served here (blora serves one base model)."""
    served = set(args.served_model_name or []) | {args.model} - {None}
    for module in args.lora_modules:
        if module.base_model_name is not None and served and module.base_model_name not in served:
            raise SystemExit(
                f"--lora-modules {module.name!r}: base_model_name {module.base_model_name!r} is not the model "
                f"served here ({sorted(served)}); blora serves adapters of one base model"
            )


def load_chat_template(spec: str | None) -> str | None:
    """``--chat-template``: the contents of a file, or the template itself (vLLM's rule: a value with
    Jinja braces or a newline is a template; anything else must be an existing file)."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SystemExit(f"--chat-template {spec!r}: cannot read it: {exc}") from None
    if any(c in spec for c in "{}\n"):
        return spec
    raise SystemExit(f"--chat-template {spec!r} is neither a file nor a Jinja template")


GENERATION_KEYS = {  # generation_config.json key -> request field it defaults
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_defaults(mode: str, model_dir: str | None) -> dict:
    """``--generation-config``: request defaults from a ``generation_config.json`` ('auto': the model's,
    a directory: that one's) or none ('vllm'). Only sampling keys are used (see ``GENERATION_KEYS``)."""
    if mode == "vllm":
        return {}
    if mode == "auto":
        if model_dir is None:
            return {}
        directory = _model_directory(model_dir)
        if directory is None:
            return {}  # no generation_config.json anywhere: the server's own defaults
    else:
        directory = Path(mode).expanduser()
        if not (directory / "generation_config.json").is_file():
            raise SystemExit(f"--generation-config {mode!r}: expected 'auto', 'vllm' or a directory with generation_config.json")  # fmt: skip
    file = directory / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--generation-config: cannot read {file}: {exc}") from None
    return {field: data[key] for key, field in GENERATION_KEYS.items() if data.get(key) is not None}


def _model_directory(model: str) -> Path | None:
    """Where ``model``'s ``generation_config.json`` lives: its directory, a ``.gguf`` file's directory, or the
    local Hugging Face cache snapshot of a hub id (never downloaded)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "generation_config.json")
    except Exception:  # not a valid repo id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


@dataclass
class EngineArgs:
    """What builds one engine: where the model and tokenizer come from, and the ``EngineConfig``.

    ``model``: HF directory, hub id in the local cache or ``.gguf`` file (None: the embedded default);
    ``tokenizer``: a directory or hub id (None: the model's); ``revision`` / ``trust_remote_code`` as in
    ``from_pretrained``; ``chat_template`` replaces the tokenizer's (the template itself, not a path).
    """

    config: EngineConfig
    model: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str | None = None
    device: str | None = None
    chat_template: str | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``AsyncLLM`` (and ``LLM``): these fields with the config's flattened."""
        source = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config"}
        config = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}
        return {**source, **config}


def engine_args(args: argparse.Namespace) -> EngineArgs:
    """The engine of the ``blora serve`` options (``check_args`` first; adapters are served apart)."""
    from blora.engine.llm_engine import EngineConfig

    config = EngineConfig(
        max_loras=args.max_loras,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
        seed=args.seed,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
        enable_prefix_caching=args.enable_prefix_caching,
        stream_interval=args.stream_interval,
        lora_backend=args.lora_backend,
        fast_path=args.fast_path,
        cpu_kernel=args.cpu_kernel,
        packed_weights=args.packed_weights,
        quantization=args.quantization,
    )
    return EngineArgs(
        config,
        model=args.model,
        tokenizer=args.tokenizer,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        device=args.device,
        chat_template=args.chat_template,
    )


def server_config(args: argparse.Namespace, **overrides: Any) -> ServerConfig:
    """``ServerConfig`` from the ``blora serve`` options; ``overrides`` for what the caller decides
    (``model_source``, ``sampling_defaults``, ``max_num_seqs``, ``adapter_root``)."""
    from blora.models.loader import DEFAULT_MODEL
    from blora.server.app import ServerConfig

    served = args.served_model_name or [args.model or DEFAULT_MODEL]
    fields = dict(
        served_model_name=served[0],
        served_model_aliases=tuple(served[1:]),
        model_source=args.model or DEFAULT_MODEL,
        api_key=args.api_key or None,
        max_num_seqs=args.max_num_seqs,
        max_queue=None if args.max_queue < 0 else args.max_queue,
        max_loras=args.max_loras,
        adapter_root=args.adapter_root,
        allow_runtime_adapters=args.allow_runtime_adapters,
        retry_after_s=args.retry_after,
        drain_timeout_s=args.drain_timeout,
        disable_docs=args.disable_docs,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_prompt_chars=args.max_prompt_chars,
        metric_names=args.metrics_names,
        log_requests=args.enable_log_requests and not args.disable_log_requests,
        allowed_origins=tuple(args.allowed_origins or ()),
        allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers),
        allow_credentials=args.allow_credentials,
        root_path=args.root_path,
        adapter_parents={m.name: m.base_model_name for m in args.lora_modules if m.base_model_name},
    )
    return ServerConfig(**{**fields, **overrides})


def sampling_defaults(args: argparse.Namespace) -> dict:
    """``--generation-config``'s request defaults for the served model (the embedded default's directory
    when no ``--model`` is given)."""
    from blora.models import default_model_dir

    model_dir = args.model if args.model is not None else str(default_model_dir())
    return generation_defaults(args.generation_config, model_dir)
