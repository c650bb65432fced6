"""Everything one ``run`` needs, as a picklable record (each LoadGen test runs in a child process)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_USER_CONF = Path(__file__).parent / "data" / "user.conf"


@dataclass
class RunConfig:
    profile: str = "tiny"
    model_path: str | None = None
    backend: str = "torch"
    dtype: str = "fp32"
    device: str = "cpu"
    encodings: str | None = None
    recipe: str | None = None
    scenario: str = "Offline"
    modes: tuple[str, ...] = ("performance",)
    dataset_path: str | None = None
    max_samples: int | None = None
    latents: str | None = None
    user_conf: str = str(DEFAULT_USER_CONF)
    audit_conf: str | None = None
    count: int | None = None
    time_s: float | None = None
    qps: float | None = None
    max_batchsize: int = 1
    threads: int = 1  # SUT worker threads: batches run at once (with --executor ray: per actor)
    executor: str = "threads"  # threads (in this process) | ray
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local Ray started by the run
    ray_actors: int | None = None  # None: one actor per GPU (cuda) or per node (cpu)
    ray_session: dict = field(default_factory=dict)  # filled by the run's parent: address, namespace, actor names
    output: str = ""
    overwrite: bool = False  # replace the run already in ``output`` (only a directory holding a run.json)
    save_images: bool = False
    warmup: bool = True
    cache_dir: str = "build/cache"
    statistics_path: str | None = None  # FID reference statistics (val2014.npz) for the accuracy audit
    reference_run: str | None = None  # run directory / log to measure fidelity against (compare)
    calibration: dict = field(default_factory=dict)  # --recipe: calibration_captions, num_prompts, timesteps
    backend_extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
