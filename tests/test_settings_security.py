"""Hostile settings: every way a value enters (CLI, environment, the app's widgets, the library) is checked
by the one declaration in ``softpatch.config``, and nothing refused ever reaches timm, the network or memory.

Each test performs the attack described in the security issue and shows it refused with a clear message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import io
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import timm
import torch

from softpatch.cli import build_parser, main
from softpatch.config import BACKBONE_KWARGS, DEFAULTS, SETTINGS, ConfigError, SoftPatchConfig
from softpatch.errors import ResourceError, SoftPatchError
from softpatch.method import features
from softpatch_app.settings import (
    APP_CONFIG_SETTINGS,
    AppSettings,
    env_name,
    read_environment,
    settings_from_widgets,
)
from tests.apptest_helpers import session
from tests.conftest import MOBILENET_KWARGS, SyntheticSet

SMALL = ["--backbone", "resnet18", "--no-pretrained", "--resize", "72", "--crop", "64", "--device", "cpu"]

# Keyword arguments timm.create_model accepts that reach the network, read files, write folders or allocate
# without bound (the class 1 and 3).
HOSTILE_KWARGS = {
    "url": {"pretrained_cfg_overlay": {"url": "http://127.0.0.1:9/evil.pth"}},
    "file": {"pretrained_cfg_overlay": {"file": "/etc/passwd"}},
    "checkpoint": {"checkpoint_path": "/etc/passwd"},
    "cache_dir": {"cache_dir": "/usr/lib/python3/dist-packages"},
    "huge": {"base_width": 1024},
    "nested_bad_value": {"bn_eps": {"url": "http://127.0.0.1:9/"}},
    "nan": {"bn_eps": float("nan")},
}
HOSTILE_NAMES = [
    "hf-hub:timm/resnet18.a1_in1k",
    "local-dir:/etc",
    "timm/resnet18",
    "../../etc/passwd",
    "resnet18?x=1",
    "Resnet18",
    "resnet18 ",
    "",
]


def run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["--quiet", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def timm_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict, str]]:
    """Every timm.create_model call: (name, kwargs, the default device it ran under)."""
    calls: list[tuple[str, dict, str]] = []
    real = timm.create_model

    def recording(name: str, *args, **kwargs):
        calls.append((name, dict(kwargs), str(torch.get_default_device())))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording)
    return calls


@pytest.fixture
def listener():
    """A local HTTP server that records every request it gets (the attacker's URL)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/weights.pth", hits
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------- class 1: backbone settings reach timm


@pytest.mark.parametrize("kwargs", HOSTILE_KWARGS.values(), ids=HOSTILE_KWARGS.keys())
def test_hostile_backbone_kwargs_are_refused_by_the_config(kwargs: dict) -> None:
    with pytest.raises(ConfigError) as info:
        SoftPatchConfig(backbone="resnet18", backbone_kwargs=kwargs)
    assert "backbone_kwargs" in str(info.value)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hub_and_path_backbone_names_are_refused_by_the_config(name: str) -> None:
    with pytest.raises(ConfigError, match="plain timm model name"):
        SoftPatchConfig(backbone=name)


def test_a_download_url_in_backbone_kwargs_is_never_fetched_from_the_cli(
    listener, timm_calls, synthetic_set: SyntheticSet, tmp_path: Path
) -> None:
    url, hits = listener
    kwargs = f'{{"pretrained_cfg_overlay": {{"url": "{url}"}}}}'
    code, _, err = run(
        [
            "fit",
            str(synthetic_set.train_dir),
            "-o",
            str(tmp_path / "m"),
            "--backbone",
            "resnet18",
            "--backbone-kwargs",
            kwargs,
        ]
    )
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "pretrained_cfg_overlay" in err
    assert hits == [] and timm_calls == [], "nothing was downloaded, timm was never called"
    assert not (tmp_path / "m").exists()


def test_a_cache_dir_in_backbone_kwargs_writes_nothing(timm_calls, synthetic_set: SyntheticSet, tmp_path: Path) -> None:
    target = tmp_path / "site-packages"
    target.mkdir()
    kwargs = f'{{"cache_dir": "{target}"}}'
    code, _, err = run(["vet", str(synthetic_set.train_dir), *SMALL, "--backbone-kwargs", kwargs])
    assert code == 2 and "cache_dir" in err and "Traceback" not in err
    assert list(target.iterdir()) == [] and timm_calls == []


@pytest.mark.parametrize("name", ["hf-hub:timm/resnet18", "local-dir:/etc"])
def test_hub_backbone_names_are_refused_by_the_cli(name: str, timm_calls, synthetic_set: SyntheticSet) -> None:
    code, _, err = run(["vet", str(synthetic_set.train_dir), "--backbone", name, "--no-pretrained"])
    assert code == 2 and "plain timm model name" in err
    assert len(err.strip().splitlines()) == 1 and timm_calls == []


def test_hostile_environment_values_become_warnings_and_defaults() -> None:
    env = read_environment(
        {
            "SOFTPATCH_BACKBONE": "hf-hub:attacker/model",
            "SOFTPATCH_BACKBONE_KWARGS": '{"checkpoint_path": "/etc/shadow"}',
            "SOFTPATCH_RESIZE": "100000",
            "SOFTPATCH_TAU": "nan",
        }
    )
    assert env.settings.backbone == DEFAULTS["backbone"] and env.settings.backbone_kwargs == {}
    assert env.settings.resize == DEFAULTS["resize"] and env.settings.tau == DEFAULTS["tau"]
    text = " ".join(env.warnings)
    for needle in ("SOFTPATCH_BACKBONE=", "checkpoint_path", "SOFTPATCH_RESIZE", "SOFTPATCH_TAU"):
        assert needle in text


@pytest.mark.parametrize(
    ("widget", "raw"),
    [
        ("backbone_kwargs", '{"pretrained_cfg_overlay": {"file": "/etc/passwd"}}'),
        ("backbone_kwargs", '{"cache_dir": "/tmp"}'),
        ("backbone_kwargs", "[" * 100_000),  # nested beyond the parser's recursion limit
        ("backbone", "hf-hub:attacker/model"),
        ("size", "100000/90000"),
        ("tau", float("inf")),
    ],
)
def test_hostile_widget_values_keep_the_previous_settings(widget: str, raw: object) -> None:
    current = AppSettings(backbone="resnet18", backbone_kwargs={"bn_eps": 0.001})
    wanted, problems = settings_from_widgets(current, {widget: raw})
    assert wanted == current
    assert len(problems) == 1 and "keeping the previous" in problems[0]


def test_the_denoise_page_refuses_hostile_kwargs_without_calling_timm(timm_calls, app_env) -> None:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=120).run()
    at.switch_page("pages/2_denoise.py").run()
    hostile = '{"pretrained_cfg_overlay": {"url": "http://127.0.0.1:9/x"}}'
    at.text_input(key="dn_kwargs").set_value(hostile).run()
    warnings_text = " ".join(w.value for w in at.warning)
    assert "pretrained_cfg_overlay" in warnings_text and "keeping the previous value" in warnings_text
    assert not at.exception
    fit = next(b for b in at.button if b.label.startswith("Fit"))
    fit.click().run()
    assert not at.exception
    model = session(at).model
    assert model is not None and model.config.backbone_kwargs == MOBILENET_KWARGS, "fitted with the previous kwargs"
    assert all("pretrained_cfg_overlay" not in kwargs for _, kwargs, _ in timm_calls)


# ---------------------------------------------------------------- class 3: memory before any check


def test_a_backbone_too_large_is_refused_before_it_is_built(monkeypatch, timm_calls, small_config) -> None:
    monkeypatch.setattr(features, "_MAX_BACKBONE_BYTES", 1024**2)  # 1 MiB: resnet18 is ~45 MB
    with pytest.raises(ResourceError, match="choose a smaller backbone"):
        features.create_backbone(small_config)
    assert timm_calls and all(device == "meta" for _, _, device in timm_calls), "only the meta build ran"


def test_backbone_size_is_counted_without_allocating(small_config) -> None:
    size = features.backbone_bytes(small_config)
    real = features.create_backbone(small_config)
    assert size == sum(t.numel() * t.element_size() for t in [*real.parameters(), *real.buffers()])


def test_vet_refuses_what_would_not_fit_in_memory_before_reading_images(monkeypatch, synthetic_set) -> None:
    import softpatch.method.model as model_module

    monkeypatch.setattr(model_module, "available_memory", lambda device: 64 * 1024**2)
    loaded: list[object] = []
    monkeypatch.setattr(model_module, "_load_one", lambda image: loaded.append(image))
    code, _, err = run(["vet", str(synthetic_set.train_dir), *SMALL])
    assert code == 2 and "needs about" in err and "Traceback" not in err
    assert loaded == [], "no image was read"


def test_sizes_have_upper_bounds() -> None:
    for name in ("resize", "crop", "feature_dim", "patch_size", "batch_size", "lof_k", "projection_dim", "seed"):
        assert SETTINGS[name].high is not None, name
        with pytest.raises(ConfigError, match=name):
            SoftPatchConfig(**{name: int(SETTINGS[name].high) + 2})


# ---------------------------------------------------------------- class 7: the CLI's bad inputs


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--seed", "99999999999999999999"], "seed must be in"),
        (["--resize", "100000", "--crop", "90000"], "resize must be in"),
        (["--tau", "nan"], "tau must be a finite number"),
        (["--layers", "2,x"], "layers must be a whole number"),
        (["--backbone-kwargs", "[" * 100_000], "backbone_kwargs must be a JSON object"),
    ],
)
def test_cli_bad_values_are_one_line(args: list[str], words: str, synthetic_set) -> None:
    code, out, err = run(["vet", str(synthetic_set.train_dir), *SMALL, *args])
    assert code == 2 and out == ""
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_weights_that_are_a_text_file_give_one_clear_line(synthetic_set, tmp_path: Path) -> None:
    text = tmp_path / "weights.pth"
    text.write_text("these are not weights\n")
    code, _, err = run(["vet", str(synthetic_set.train_dir), "--backbone", "resnet18", "--weights", str(text)])
    assert code == 2 and "cannot read weights file weights.pth" in err
    assert "index out of range" not in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_during_start_up_imports_is_one_line() -> None:
    # A real SIGINT, sent the moment the command starts importing torch (its slowest start-up step). raise_signal
    # delivers it to this (the main) thread: os.kill lets the kernel pick any thread, and numpy's BLAS threads
    # already exist, so on a saturated machine the handler could run only after the command had finished.
    script = (
        "import builtins, signal, sys\n"
        "real = builtins.__import__\n"
        "def hooked(name, *args, **kwargs):\n"
        "    if name == 'torch':\n"
        "        builtins.__import__ = real\n"
        "        signal.raise_signal(signal.SIGINT)\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = hooked\n"
        "from softpatch.cli import main\n"
        "sys.exit(main(['vet', 'some_folder']))\n"
    )
    # Started as from a terminal: SIGINT at its default. A suite run as a background job (`cmd &` in a script)
    # inherits SIGINT ignored, and Python then never turns the signal into KeyboardInterrupt.
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr == "softpatch: interrupted\n"


# ---------------------------------------------------------------- one declaration, derived everywhere


def test_every_cli_option_is_derived_from_the_declaration() -> None:
    parser = build_parser()
    fit = parser._subparsers._group_actions[0].choices["fit"]
    by_dest = {a.dest: a for a in fit._actions}
    for name, setting in SETTINGS.items():
        assert name in by_dest, f"fit has no option for {name}"
        assert by_dest[name].default == DEFAULTS[name]
        assert setting.help in by_dest[name].help


def test_app_settings_defaults_are_the_configs() -> None:
    app = AppSettings()
    config = app.fit_config()
    for name in APP_CONFIG_SETTINGS:
        if name != "weights":
            assert getattr(app, name) == DEFAULTS[name] == getattr(config, name)
    names = {f.name for f in dataclasses.fields(AppSettings)}
    assert names == (set(APP_CONFIG_SETTINGS) - {"weights"}) | {"weights_mode", "weights_path"}


def test_every_app_setting_is_read_from_its_environment_variable(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    values = {
        "backbone": "resnet18",
        "backbone_kwargs": '{"pad_type": "same"}',
        "weights": str(weights),
        "device": "cpu",
        "resize": "160",
        "crop": "128",
        "discriminator": "fusion",
        "tau": "0.2",
        "lof_k": "9",
        "coreset_ratio": "0.25",
        "soft_weight": "false",
    }
    assert set(values) == set(APP_CONFIG_SETTINGS)
    env = read_environment({env_name(k): v for k, v in values.items()})
    assert not env.warnings
    s = env.settings
    assert (s.backbone, s.backbone_kwargs, s.weights_path, s.device) == (
        "resnet18",
        {"pad_type": "same"},
        str(weights),
        "cpu",
    )
    assert (s.resize, s.crop, s.discriminator, s.tau, s.lof_k, s.coreset_ratio, s.soft_weight) == (
        160,
        128,
        "fusion",
        0.2,
        9,
        0.25,
        False,
    )


def test_backbone_kwargs_allow_list_values_are_checked() -> None:
    assert set(BACKBONE_KWARGS) == {"bn_eps", "pad_type"}
    assert SoftPatchConfig(backbone_kwargs={"bn_eps": 1e-3, "pad_type": "same"}).backbone_kwargs["pad_type"] == "same"
    for bad in ({"bn_eps": -1.0}, {"bn_eps": "0.001"}, {"pad_type": "../../x"}):
        with pytest.raises(ConfigError, match="backbone_kwargs"):
            SoftPatchConfig(backbone_kwargs=bad)


def test_config_errors_are_softpatch_errors() -> None:
    assert issubclass(ConfigError, SoftPatchError) and issubclass(ConfigError, ValueError)


def test_a_weights_path_typed_in_the_browser_must_pass_the_server_path_policy(tmp_path: Path) -> None:
    from softpatch_app.server_paths import server_path_policy

    allowed_root = tmp_path / "models"
    allowed_root.mkdir()
    good = allowed_root / "w.safetensors"
    good.write_bytes(b"x")
    workdir = tmp_path / "work"
    (workdir / "ws-other").mkdir(parents=True)
    planted = workdir / "ws-other" / "upload.safetensors"
    planted.write_bytes(b"x")
    policy = server_path_policy((allowed_root,), workdir, "0.0.0.0")
    current = AppSettings(weights_mode="file", weights_path="/opt/admin/configured.safetensors")
    for hostile in ("/etc/passwd", str(planted), str(allowed_root / ".." / "work" / "ws-other" / "upload.safetensors")):
        wanted, problems = settings_from_widgets(current, {"weights_path": hostile}, server_file=policy.file)
        assert wanted.weights_path == current.weights_path and len(problems) == 1, hostile
    wanted, problems = settings_from_widgets(current, {"weights_path": str(good)}, server_file=policy.file)
    assert wanted.weights_path == str(good) and not problems
    # The path configured by the administrator (SOFTPATCH_WEIGHTS) stays usable, whatever the policy.
    wanted, problems = settings_from_widgets(current, {"weights_path": current.weights_path}, server_file=policy.file)
    assert wanted == current and not problems
    # With server paths off, no new path is accepted at all.
    off = server_path_policy((), workdir, "0.0.0.0")
    wanted, problems = settings_from_widgets(current, {"weights_path": str(good)}, server_file=off.file)
    assert wanted == current and "off" in problems[0].lower()
