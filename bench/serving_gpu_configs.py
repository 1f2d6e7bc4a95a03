"""Backend configs and the speed plan of bench/serving_gpu.py: the ``--configs`` grammar,
the flags and environment a config gives its two servers, the groups of pairs started
together on the GPU, and the time estimates that decide what a call still runs.

Grammar (one config; ``--configs`` takes a comma-separated list)::

    NAME[:BUDGET[:KEYS]][+lgN][+sent][@LINK]

* NAME: ``mooncake`` (stock, bf16 KV), ``mooncake-fp8`` (stock, ``--kv-cache-dtype
  fp8_e4m3`` on both servers), ``spectrum`` (bf16 pools, the default
  ``--spectrum-staging auto``: host under Mooncake TCP, device on NVLink),
  ``spectrum-fp8`` (FP8 pools on both servers), ``spectrum-asym`` (bf16 prefill, FP8
  decode), ``spectrum-host`` / ``spectrum-device`` (bf16 pools, ``--spectrum-staging
  host|device`` on both servers: packed parts sent from and received into pinned host
  memory, or GPU memory).
* BUDGET (spectrum only): a number in (0, 1] (``--spectrum-budget B``) or ``auto``
  (``--spectrum-budget auto --spectrum-min-budget M``, M from ``--min-budget``); none:
  the server's default.
* KEYS (spectrum only): ``channel`` or ``token`` (``--spectrum-key-scales``).
* ``+lgN`` (spectrum only): ``--spectrum-layer-group N`` on the prefill (each chunk sent
  in parts of N layers during its forward; the plan's servers run eager forwards).
* ``+sent`` (spectrum only): ``--spectrum-unpack sent`` on the decode (every part unpacked
  once the request is written; default: each part as it lands).
* LINK: ``tcp`` (default: ``MC_FORCE_TCP=1``, Mooncake's TCP transport over loopback),
  ``nvlink`` (``SGLANG_MOONCAKE_CUSTOM_MEM_POOL=INTRA_NODE_NVLINK``,
  ``MC_INTRANODE_NVLINK=true``, ``MC_FORCE_TCP`` removed: Mooncake's engine installs its
  intra-node NVLink transport when that variable exists and ``MC_FORCE_TCP`` does not,
  ``transfer_engine_impl.cpp``; SGLang reads the pool type in
  ``disaggregation/mooncake/utils.py``), or ``tcpslice=N`` (TCP with
  ``MC_TCP_SLICE_SIZE=N``, suffixes K/M: the TCP transport moves a write in slices of N
  bytes, default 64 KiB, one at a time per connection, each staged through host memory
  with a synchronous cudaMemcpy: larger slices amortise that per-slice cost, a higher
  rate between plain TCP and NVLink, the same for both backends).

Examples: ``mooncake``, ``mooncake-fp8@tcp``, ``spectrum:0.5``, ``spectrum:auto@nvlink``,
``spectrum:0.5+lg8@tcp``, ``spectrum:0.5+lg8+sent@tcp``,
``spectrum-fp8:0.3``, ``spectrum-asym:0.3``, ``spectrum:0.5:channel@tcpslice=1M``.
"""

from __future__ import annotations

from dataclasses import dataclass

FP8 = "fp8_e4m3"
BF16 = "bf16"
# NAME -> (transfer backend, prefill KV dtype, decode KV dtype)
BACKENDS = {
    "mooncake": ("mooncake", BF16, BF16),
    "mooncake-fp8": ("mooncake", FP8, FP8),
    "spectrum": ("spectrum", BF16, BF16),
    "spectrum-fp8": ("spectrum", FP8, FP8),
    "spectrum-asym": ("spectrum", BF16, FP8),
    "spectrum-host": ("spectrum", BF16, BF16),  # --spectrum-staging host on both servers
    "spectrum-device": ("spectrum", BF16, BF16),  # --spectrum-staging device on both
}
# every variable a link sets; a server's environment starts without them
LINK_ENV_KEYS = (
    "MC_FORCE_TCP",
    "MOONCAKE_PROTOCOL",
    "MC_INTRANODE_NVLINK",
    "SGLANG_MOONCAKE_CUSTOM_MEM_POOL",
    "MC_TCP_SLICE_SIZE",
)
DEFAULT_PLAN = (
    "mooncake@tcp,mooncake-fp8@tcp,spectrum:0.5@tcp,spectrum:0.3@tcp,spectrum:auto@tcp,"
    "spectrum-fp8:0.3@tcp,spectrum-asym:0.3@tcp,mooncake@nvlink,spectrum:auto@nvlink"
)


def _size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:].upper(), 1)
    n = int(text[:-1] if mult > 1 else text) * mult
    if n <= 0:
        raise ValueError(f"slice size must be positive: {text}")
    return n


@dataclass(frozen=True)
class Config:
    """One backend config: what its prefill and decode servers run with."""

    kind: str  # a BACKENDS name
    budget: float | str | None = None  # number, "auto", None (mooncake / server default)
    key_scales: str | None = None
    link: str = "tcp"  # tcp | nvlink | tcpslice=N
    min_budget: float | None = None  # with budget "auto"
    layer_group: int = 0  # --spectrum-layer-group of the prefill (0: off)
    unpack_at_sent: bool = False  # --spectrum-unpack sent on the decode

    @property
    def transfer(self) -> str:
        return BACKENDS[self.kind][0]

    @property
    def spectrum(self) -> bool:
        return self.transfer == "spectrum"

    def kv_dtype(self, role: str) -> str:
        """KV cache dtype of the ``role`` (prefill|decode|single) server."""
        return BACKENDS[self.kind][2 if role == "decode" else 1]

    @property
    def budget_mode(self) -> str | None:
        if not self.spectrum:
            return None
        return "auto" if self.budget == "auto" else "fixed"

    @property
    def name(self) -> str:
        """Canonical text (the grammar's), also the record's ``config``."""
        s = self.kind
        if self.spectrum and self.budget is not None:
            s += f":{self.budget if self.budget == 'auto' else format(self.budget, 'g')}"
            if self.key_scales:
                s += f":{self.key_scales}"
        elif self.spectrum and self.key_scales:
            s += f"::{self.key_scales}"
        if self.layer_group:
            s += f"+lg{self.layer_group}"
        if self.unpack_at_sent:
            s += "+sent"
        return f"{s}@{self.link}"

    @property
    def tag(self) -> str:
        """File-name-safe name for process logs and stats files."""
        s = self.kind
        if self.spectrum and self.budget is not None:
            s += f"-b{self.budget if self.budget == 'auto' else format(self.budget, 'g')}"
        if self.spectrum and self.key_scales:
            s += f"-{self.key_scales}"
        if self.layer_group:
            s += f"-lg{self.layer_group}"
        if self.unpack_at_sent:
            s += "-sent"
        return f"{s}-{self.link.replace('=', '')}"

    def flags(self, role: str, tiers: str | None = None) -> list[str]:
        """Transfer-backend, spectrum and KV-dtype flags of the ``role`` server."""
        out = ["--disaggregation-transfer-backend", self.transfer]
        if self.spectrum:
            if tiers:
                out += ["--spectrum-tiers", tiers]
            if self.budget == "auto":
                out += ["--spectrum-budget", "auto"]
                if self.min_budget is not None:
                    out += ["--spectrum-min-budget", f"{self.min_budget:g}"]
            elif self.budget is not None:
                out += ["--spectrum-budget", f"{self.budget:g}"]
            if self.key_scales:
                out += ["--spectrum-key-scales", self.key_scales]
            if self.kind in ("spectrum-host", "spectrum-device"):
                out += ["--spectrum-staging", self.kind.split("-")[1]]
            if self.layer_group and role == "prefill":
                out += ["--spectrum-layer-group", str(self.layer_group)]
            if self.unpack_at_sent and role == "decode":
                out += ["--spectrum-unpack", "sent"]
        return out + kv_flags(self.kv_dtype(role))

    def env(self) -> dict[str, str]:
        """The link's variables (every other LINK_ENV_KEYS variable is removed)."""
        if self.link == "nvlink":
            return {
                "SGLANG_MOONCAKE_CUSTOM_MEM_POOL": "INTRA_NODE_NVLINK",
                "MC_INTRANODE_NVLINK": "true",
            }
        env = {"MC_FORCE_TCP": "1", "MOONCAKE_PROTOCOL": "tcp"}
        if self.link.startswith("tcpslice="):
            env["MC_TCP_SLICE_SIZE"] = str(_size(self.link.split("=", 1)[1]))
        return env

    def max_tokens(self, role: str, bf16_tokens: int) -> int:
        return token_cap(self.kv_dtype(role), bf16_tokens)


def token_cap(dtype: str, bf16_tokens: int | None) -> int | None:
    """Token cap of a KV pool given the bytes of ``bf16_tokens`` 16-bit tokens: an FP8
    pool holds twice the tokens in the same memory."""
    return None if bf16_tokens is None else bf16_tokens * (2 if dtype == FP8 else 1)


def kv_flags(dtype: str) -> list[str]:
    return [] if dtype == BF16 else ["--kv-cache-dtype", dtype]


def parse_config(
    text: str, key_scales: str | None = None, min_budget: float | None = 0.3
) -> Config:
    """One ``--configs`` entry (module docstring); ``key_scales``: default KEYS of
    spectrum configs that name none."""
    body, _, link = text.strip().partition("@")
    link = link or "tcp"
    body, *mods = body.split("+")
    layer_group, unpack_at_sent = 0, False
    for mod in mods:
        if mod == "sent" and not unpack_at_sent:
            unpack_at_sent = True
        elif mod.startswith("lg") and mod[2:].isdigit() and int(mod[2:]) > 0 and not layer_group:
            layer_group = int(mod[2:])
        else:
            raise ValueError(f"{text}: +{mod}: the modifiers are +lgN (N > 0) and +sent, once")
    if link not in ("tcp", "nvlink") and not link.startswith("tcpslice="):
        raise ValueError(f"{text}: link must be tcp, nvlink or tcpslice=N")
    if link.startswith("tcpslice="):
        _size(link.split("=", 1)[1])
    parts = body.split(":")
    kind = parts[0]
    if kind not in BACKENDS:
        raise ValueError(f"{text}: backend must be one of {', '.join(BACKENDS)}")
    if BACKENDS[kind][0] != "spectrum":
        if any(p for p in parts[1:]) or mods:
            raise ValueError(f"{text}: {kind} takes no budget, key scales or modifiers")
        return Config(kind, link=link)
    budget: float | str | None = None
    if len(parts) > 1 and parts[1]:
        if parts[1] == "auto":
            budget = "auto"
        else:
            budget = float(parts[1])
            if not 0 < budget <= 1:
                raise ValueError(f"{text}: budget must be in (0, 1] or auto")
    ks = parts[2] if len(parts) > 2 and parts[2] else key_scales
    if ks not in (None, "channel", "token"):
        raise ValueError(f"{text}: key scales must be channel or token")
    auto_min = min_budget if budget == "auto" else None
    return Config(kind, budget, ks, link, auto_min, layer_group, unpack_at_sent)


def parse_configs(texts: list[str], key_scales=None, min_budget=0.3) -> list[Config]:
    out: list[Config] = []
    for t in texts:
        c = parse_config(t, key_scales, min_budget)
        if c not in out:
            out.append(c)
    return out


def groups(configs: list[Config], size: int) -> list[list[Config]]:
    """The configs in order, ``size`` pairs at a time (started together)."""
    size = max(1, size)
    return [configs[i : i + size] for i in range(0, len(configs), size)]


# GiB one 8B-shaped speed server takes on its GPU (bf16 weights ~15, its token-capped
# pool, CUDA graphs, workspace): two pairs on one card fit the H200's 139 GiB; on an
# H100's 80 GiB the second pair's servers were killed at start (rc -9, 2026-12-05 s12)
SPEED_SERVER_GIB = 30.0


def pairs_that_fit(gpu_gib: float | None, split: bool) -> int | None:
    """PD pairs of speed servers one start can hold: a GPU of ``gpu_gib`` GiB holds both
    servers of each pair (``split``: one of each, prefill and decode on two GPUs); at
    least 1 (a lone pair that cannot fit fails at its start, with SGLang's reason).
    None: the memory is unknown (no cap)."""
    if not gpu_gib:
        return None
    per_gpu = 1 if split else 2
    return max(1, int(gpu_gib // (per_gpu * SPEED_SERVER_GIB)))


# ------------------------------------------------------------------------ time estimates


class Estimates:
    """Seconds a point, a warm-up and a group start take: measured ones from the state
    (this machine, earlier points), else guesses from the last H200 runs."""

    def __init__(self, state: dict, num_prompts: int, cpu: bool, per_point_s: float):
        self.point_s = state.setdefault("point_s", {})  # "link|L|C" -> [seconds]
        self.startup = state.setdefault("startup_s", [])  # seconds per group start
        self.n = num_prompts + 1  # + bench_serving's warm-up request
        self.cpu = cpu
        self.per_point_s = per_point_s  # fixed cost of one bench_serving run

    @staticmethod
    def _key(cfg: Config, L: int, C: int) -> str:
        return f"{'nvlink' if cfg.link == 'nvlink' else 'tcp'}|{L}|{C}"

    def add_point(self, cfg: Config, L: int, C: int, seconds: float) -> None:
        self.point_s.setdefault(self._key(cfg, L, C), []).append(round(seconds, 1))

    def add_startup(self, seconds: float) -> None:
        self.startup.append(round(seconds, 1))

    def point(self, cfg: Config, L: int, C: int) -> float:
        seen = self.point_s.get(self._key(cfg, L, C))
        if seen:
            return 1.05 * sum(seen) / len(seen)
        if self.cpu:
            per = 2.0 + 8.0 * L / 4096
        elif cfg.link == "nvlink":
            per = 0.15 + 0.45 * L / 16384  # 16k: ~0.55 s TTFT measured for mooncake
        else:
            per = 0.2 + 2.1 * L / 16384  # 16k, one GPU, mooncake TCP: 2.08 s TTFT
        return self.per_point_s + per * self.n * (0.8 if C > 1 else 1.0)

    def start(self) -> float:
        """A group's start: the slowest warm start seen, with a quarter's margin (a
        machine's first start also fills the Triton, FlashInfer and torch compile caches:
        206 s against 75-77 s for the next ones on the H100, 2026-12-05), else the first
        start, else a guess."""
        if len(self.startup) > 1:
            return 1.25 * max(self.startup[1:])
        return self.startup[0] if self.startup else (150.0 if self.cpu else 100.0)

    def group(self, todo: dict[Config, list[tuple[int, int]]]) -> float:
        """A group's start, warm-ups, points and stop."""
        pts = sum(self.point(c, L, C) for c, ps in todo.items() for L, C in ps)
        return self.start() + pts + 8.0 * len(todo) + 15.0
