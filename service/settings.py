"""All service settings in one typed object: `PTX_*` environment variables over an optional TOML file.

`PTX_CONFIG_FILE=/etc/ptx/service.toml` names the file (keys as below, lower case); an environment
variable always wins over the file, and the file over the defaults. Unknown keys are errors, so a misspelt
setting never silently keeps its default. Defaults are the embedded ones `make serve` runs with: the bundled
demo models from `models/`, SQLite under `data/`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PTX_", extra="forbid", frozen=True)

    models_dir: Path = Field(default_factory=lambda: REPO_ROOT / "models")
    classifier: str | None = None  # model name in models_dir; None: the only classification model there
    segmenter: str | None = None
    data_dir: Path = Field(default_factory=lambda: REPO_ROOT / "data" / "service")
    database_url: str | None = None  # None: SQLite in data_dir; postgresql://... for PostgreSQL
    hflip_tta: bool = True
    mm_morphology: bool = False
    stat_score: float = Field(default=0.9, gt=0, le=1)
    stat_area_mm2: float = Field(default=3000.0, gt=0)
    # Issue 16: the site's pneumothorax prevalence for the fused score's prior shift (None: the fusion's own);
    # the highest priority an out-of-distribution film gets (service/cascade/finding.py says why URGENT).
    prevalence: float | None = Field(default=0.22, gt=0, lt=1)
    ood_max_priority: Literal["STAT", "URGENT", "ROUTINE"] = "URGENT"
    # Inference: "auto" picks ONNX Runtime (TensorRT → CUDA → CPU provider), else PyTorch CUDA, else ORT CPU.
    backend: Literal["auto", "onnxruntime", "torch"] = "auto"
    # Model weights' precision (issue 15): auto = FP16 on a GPU, FP32 on a CPU; int8 = the manifest's QDQ model.
    precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    intra_op_threads: int = Field(default=0, ge=0)  # 0: one per core
    ort_spinning: bool = False  # ONNX Runtime's idle threads busy-wait: only on a box that runs nothing else
    trt_cache_dir: Path | None = None  # TensorRT engine cache; None: <data_dir>/trt-cache
    # Adaptive batching (BentoML), for each model. max_latency_ms is the bound after which BentoML answers
    # 503 instead of queueing: generous, so ordinary load on a 2-core CPU never meets it.
    max_batch_size: int = Field(default=16, ge=1, le=256)
    max_latency_ms: int = Field(default=20000, ge=100)
    greedy_batching: bool = True  # dispatch whenever the model is free (service/batching.py)
    # Both models in the edge's process, no model worker (service/models/local_models.py): one edge worker only.
    models_in_edge: bool = False
    # Batches that run at once, each on PTX_INTRA_OP_THREADS threads (with PTX_MODELS_IN_EDGE; the worker runs one).
    model_instances: int = Field(default=1, ge=1, le=16)
    # The HTTP edge: decode/post-process threads, admission control and per-request limits.
    edge_workers: int = Field(default=1, ge=1, le=64)  # HTTP edge processes (each decodes with decode_threads)
    decode_threads: int = Field(default=2, ge=1, le=64)
    max_in_flight: int = Field(default=64, ge=1)  # films being processed at once; beyond it: 503 + Retry-After
    retry_after_s: int = Field(default=2, ge=1)
    max_files_per_request: int = Field(default=16, ge=1, le=256)
    max_file_bytes: int = Field(default=96 * 1024 * 1024, ge=1024)  # 40 M px × 2 bytes = 76 MiB + header
    # Compressed pixel data is decoded in killable worker processes (service/decode_pool.py): a decode
    # that overruns decode_timeout_s is answered 422 decode_timeout; 0 decodes in the edge's threads.
    decode_timeout_s: float = Field(default=10.0, ge=0)
    # Decode compressed films only at the resolution the models need (JPEG 2000 levels, JPEG DCT scaling),
    # with a full decode as the fallback (issue 15); false always decodes full size.
    reduced_decode: bool = True
    decode_memory_mb: int = Field(default=2048, ge=64)  # address space a decode worker may add
    # What counts as a chest radiograph (service/imaging/acceptance.py), comma-separated, "*" for any: a site
    # whose modality says e.g. BodyPartExamined=TORSO for chest films adds its spelling here, not in code.
    # An absent or empty Body Part Examined is accepted; a present one must contain one of the tokens.
    accept_modalities: str = Field(default="CR,DX,DR", min_length=1)
    accept_sop_classes: str = Field(default=("1.2.840.10008.5.1.4.1.1.1,1.2.840.10008.5.1.4.1.1.1.1,"
                                             "1.2.840.10008.5.1.4.1.1.1.1.1,1.2.840.10008.5.1.4.1.1.7"), min_length=1)
    accept_body_parts: str = Field(default="CHEST,THORAX,THORAC,LUNG,TORAX,TORACE,BRUST,POITRINE,PECHO",
                                   min_length=1)
    accept_min_side: int = Field(default=256, ge=1)  # pixels per side
    accept_max_side: int = Field(default=8192, ge=1)
    accept_max_pixels: int = Field(default=40_000_000, ge=1)
    mask_default: Literal["png", "rle", "none"] = "png"
    reject_inverted: bool = False
    warmup: bool = True  # run each model once per batch size before /readyz says ready
    # A model whose run fails (or answers NaN) is out of service, /readyz unready, calls 503, for this long;
    # then a probe (the warm-up input, compared with its output at start) brings it back.
    model_cooldown_s: float = Field(default=30.0, ge=0)
    # PACS side (service/pacs.py): off unless dicom_port is set. Spool and results under data_dir.
    dicom_port: int | None = Field(default=None, ge=1, le=65535)
    dicom_host: str = "0.0.0.0"  # PACS and modalities call from other hosts
    dicom_ae_title: str = Field(default="PTXTRIAGE", min_length=1, max_length=16)
    dicom_allowed_aes: str | None = None  # comma-separated AE, AE@10.0.0.5, AE@10.1.0.0/16; None: any
    dicom_max_associations: int = Field(default=10, ge=1)
    dicom_max_pdu: int = Field(default=256 * 1024, ge=0)  # bytes we receive per P-DATA PDU (0: unlimited)
    # A peer that connects and then stalls (or drips) releases its association slot within these (issue 13 §2).
    dicom_acse_timeout_s: float = Field(default=10.0, gt=0)  # TCP accept → A-ASSOCIATE-RQ complete
    dicom_network_timeout_s: float = Field(default=30.0, gt=0)  # longest silence inside an association
    spool_min_free_mb: int = Field(default=512, ge=0)  # below this free space C-STOREs get 0xA700 (0: no floor)
    intake_workers: int = Field(default=2, ge=1, le=64)
    record_http: bool = False  # also put films triaged over HTTP on the worklist
    outputs_retry_s: float = Field(default=30.0, gt=0)  # first retry of a finding's SEG/SR/SC; doubles to 1 h
    destinations: str = ""  # comma-separated: [name=]dicom://AE@host:port, [name=]dicomweb+http://host:port/path
    send_overlay: bool = False  # also send the Secondary Capture (for a PACS that cannot show SEG)
    delivery_max_attempts: int = Field(default=10, ge=1)
    delivery_backoff_s: float = Field(default=30.0, gt=0)
    delivery_backoff_max_s: float = Field(default=3600.0, gt=0)
    delivery_lease_s: float = Field(default=300.0, ge=5)  # a dispatcher's claim on a batch (deliveries, notifications)
    # Access control and privacy (service/auth.py, docs/security.md). No token: authentication off.
    api_token: SecretStr | None = None  # bearer token for every endpoint but the open ones
    api_token_file: Path | None = None  # one token per line (two during a rotation); read at start
    # Without a token the service may only listen on loopback, unless this says otherwise (issue 13 §7).
    allow_anonymous: bool = False
    auth_open_health: bool = True  # /healthz, /livez, /readyz without a token (kubelet probes send none)
    auth_open_metrics: bool = False  # /metrics without a token (Prometheus can send one: authorization.credentials)
    auth_open_docs: bool = True  # the OpenAPI page and /docs.json without a token (they hold no data)
    deidentify_responses: bool = False  # triage/inspect answers without UIDs (pseudonyms with deidentify_key)
    deidentify_key: SecretStr | None = None  # HMAC key for UID pseudonyms; unset: UIDs are left out
    retention_days: float = Field(default=30.0, ge=0)  # results and leftover spool files; 0 keeps them forever
    drain_timeout_s: float = Field(default=30.0, ge=0)  # on SIGTERM: admitted work gets this long to finish
    # The reading room (issue 14): a study's link in the site's viewer, {study_uid} replaced per study.
    viewer_url: str | None = None  # e.g. https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_uid}
    # Pushed notifications (issue 14 §5) for findings at these priorities, through a durable outbox.
    notify_priorities: str = Field(default="STAT,URGENT", min_length=1)
    notify_hl7: str = ""  # mllp://host:port of a RIS taking HL7 v2.5.1 ORU^R01; empty: none
    notify_hl7_patient_ids: bool = False  # PID-3/PID-5 from the film in the HL7 message (only there, never logged)
    notify_webhook: str = ""  # http(s)://... receiving a signed JSON POST; empty: none
    notify_webhook_secret: SecretStr | None = None  # HMAC-SHA256 key for X-PTX-Signature; required with a webhook
    # Beyond one machine (issue 17). A listener owns its spool and its instances: recovery, retention and the
    # outputs retries touch only rows with its name (a StatefulSet pod's name is a good one).
    listener_name: str = Field(default="listener", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    triage_url: str | None = None  # http(s)://host:port of the triage replicas; None: triage in this process
    triage_token: SecretStr | None = None  # bearer token sent to triage_url (its PTX_API_TOKEN)
    triage_timeout_s: float = Field(default=120.0, gt=0)  # one film's triage over HTTP, body to answer
    # Result objects (SEG/SR/SC/overlay PNG) also kept in the database, so any replica serves them (issue 17 §4).
    results_in_database: bool | None = None  # None: yes with PostgreSQL (replicas share it), no with SQLite
    results_database_max_bytes: int = Field(default=16 * 1024 * 1024, ge=0)  # larger objects stay in files only

    @field_validator("dicom_allowed_aes")
    @classmethod
    def _allowlist(cls, value: str | None) -> str | None:
        """Parse it now, so a bad entry stops start-up with its message rather than the PACS side later."""
        if value is not None:
            from service.pacs.allowlist import CallingAeAllowlist

            CallingAeAllowlist.parse(value)
        return value

    @model_validator(mode="after")
    def _one_edge_with_local_models(self) -> Settings:
        """Each edge process would load its own models and batch alone: refused rather than done quietly."""
        if self.models_in_edge and self.edge_workers > 1:
            raise ValueError(f"PTX_MODELS_IN_EDGE needs PTX_EDGE_WORKERS=1 (got {self.edge_workers}): each edge "
                             "process would load both models; use the model worker for several edge processes")
        if self.model_instances > 1 and not self.models_in_edge:
            raise ValueError(f"PTX_MODEL_INSTANCES={self.model_instances} needs PTX_MODELS_IN_EDGE: the model worker "
                             "runs one batch at a time")
        return self


def load_settings(config_file: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Settings from the TOML file (argument, else $PTX_CONFIG_FILE) with environment variables on top."""
    environ = dict(os.environ if environ is None else environ)
    path = config_file or (Path(environ["PTX_CONFIG_FILE"]) if environ.get("PTX_CONFIG_FILE") else None)
    from_file: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ValueError(f"settings file {path} (PTX_CONFIG_FILE) not found")
        with path.open("rb") as handle:
            from_file = tomllib.load(handle)
    known = set(Settings.model_fields)
    unknown = sorted(set(from_file) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)} in {path}; known: {', '.join(sorted(known))}")
    from_env = {name: environ[f"PTX_{name.upper()}"] for name in known if f"PTX_{name.upper()}" in environ}
    return Settings.model_validate({**from_file, **from_env})
