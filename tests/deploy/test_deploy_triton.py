"""Triton model repositories: every config parses with Triton's own schema; engines become tensorrt_plan models."""

import json

import onnxruntime as ort
import pytest
from deploy_helpers import arch_params
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from fine_infer._atomic import DIR_MODE
from fine_infer.bundle import read_bundle
from fine_infer.errors import ConfigError
from fine_infer.export.engines import build_bundle_engines
from fine_infer.export.triton_repo import model_config, write_triton_repo


def parse(path) -> model_config_pb2.ModelConfig:
    """Parse a config.pbtxt with Triton's ModelConfig message (an unknown field raises ParseError)."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("arch", arch_params())
def test_repository_configs_parse_for_every_arch(deploy_bundle, arch, tmp_path):
    out, _, model = deploy_bundle(arch)
    repo = tmp_path / "repo"
    models = write_triton_repo(out, repo)
    manifest = read_bundle(out).manifest
    graphs = {n: i for n, i in models.items() if i["kind"] == "graph"}
    assert set(graphs) == {f"{arch.replace('-', '_')}_{g}" for g in manifest.graphs}
    for name in models:  # the raw-input ensembles and the Python preprocessing model too (tests/triton serves them)
        parse(repo / name / "config.pbtxt")
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "Preprocessing" in readme
    for name, info in graphs.items():
        cfg = parse(repo / name / "config.pbtxt")
        spec = manifest.graphs[info["graph"]].spec
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
        assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
        assert [i.name for i in cfg.input] == [t.name for t in spec.inputs]
        for t, i in zip(spec.inputs, cfg.input):  # batch dim implicit, other dynamic dims -1
            assert list(i.dims) == [d if isinstance(d, int) else -1 for d in t.shape[1:]]
            want = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}[t.dtype]
            assert model_config_pb2.DataType.Name(i.data_type) == want
        assert (repo / name / "1" / "model.onnx").is_file()
        pre = json.loads((repo / name / "preprocess.json").read_text())
        assert pre["image"] == (json.loads(json.dumps(manifest.image.to_dict())) if manifest.image else None)
        assert (repo / name / "tokenizer.json").is_file() == any(t.name == "input_ids" for t in spec.inputs)
        if manifest.image:
            assert f"mean {list(manifest.image.mean)}" in readme
        # the served file is the bundle's graph and runs on the config's batch
        feeds = {k: v.numpy() for k, v in model.example_inputs(info["graph"], 4).items()}
        session = ort.InferenceSession(repo / name / "1" / "model.onnx", providers=["CPUExecutionProvider"])
        outs = session.run(None, feeds)
        assert [o.shape[0] for o in outs] == [4] * len(cfg.output)


def test_int8_variant_is_served_on_cpu_instances_and_existing_repos_are_kept(deploy_bundle, tmp_path):
    out, _, _ = deploy_bundle("triplet")
    repo = tmp_path / "repo"
    write_triton_repo(out, repo, variant="int8")
    assert repo.stat().st_mode & 0o777 == DIR_MODE  # as the umask allows, not mkdtemp's 0700: the server reads it
    cfg = parse(repo / "triplet_image" / "config.pbtxt")
    assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group] == ["KIND_CPU"]
    assert (repo / "triplet_image" / "1" / "model.onnx").read_bytes() == (out / "image.int8.onnx").read_bytes()
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        write_triton_repo(out, repo)
    write_triton_repo(out, repo, force=True, max_batch_size=0)
    cfg = parse(repo / "triplet_image" / "config.pbtxt")
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [-1, 3, 64, 64]
    assert not cfg.HasField("dynamic_batching")


def test_an_engine_in_the_bundle_becomes_a_tensorrt_plan_capped_at_its_profile(deploy_bundle, tmp_path, fake_trt):
    import shutil

    src, _, _ = deploy_bundle("triplet")
    out = tmp_path / "bundle"
    shutil.copytree(src, out)
    fake_trt("10.3.0", inputs=[("pixels", (-1, 3, 64, 64))])
    build_bundle_engines(out, batch=(1, 2, 8))
    repo = tmp_path / "repo"
    models = write_triton_repo(out, repo, tensorrt_version="10.3.0")
    cfg = parse(repo / "triplet_image" / "config.pbtxt")
    assert cfg.platform == models["triplet_image"]["platform"] == "tensorrt_plan" and cfg.max_batch_size == 8
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert (repo / "triplet_image" / "1" / "model.plan").read_bytes() == b"fake-engine-bytes"
    write_triton_repo(out, repo, engines=False, force=True)
    assert parse(repo / "triplet_image" / "config.pbtxt").platform == "onnxruntime_onnx"


def test_plans_are_checked_against_the_servers_tensorrt(deploy_bundle, tmp_path, fake_trt, capsys):
    """A plan runs only on the TensorRT that built it unless built --version-compatible: triton-repo refuses a plan
    the server's TensorRT (--tensorrt-version) will not load, and warns when that version is not given."""
    import shutil

    from test_deploy_lint import run_cli

    src, _, _ = deploy_bundle("triplet")
    out = tmp_path / "bundle"
    shutil.copytree(src, out)
    fake_trt("10.3.0", inputs=[("pixels", (-1, 3, 64, 64))])
    build_bundle_engines(out)
    repo = tmp_path / "repo"
    with pytest.raises(ConfigError, match=r"triplet_image: the engine will not load on the server's TensorRT 10\.13"
                                          r"\.3\.9: built with TensorRT 10\.3\.0.*--version-compatible.*--no-engines"):
        write_triton_repo(out, repo, tensorrt_version="10.13.3.9")
    assert not repo.exists()  # refused before anything was written
    assert run_cli("triton-repo", str(out), "--out", str(repo), "--tensorrt-version", "10.13.3.9") == 2
    assert "will not load on the server's TensorRT" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="model.plan runs only on TensorRT 10.3.0; pass the server's version"):
        write_triton_repo(out, repo)
    models = write_triton_repo(out, repo, tensorrt_version="10.3.0", force=True)  # the same version: fine
    assert models["triplet_image"]["tensorrt"]["tensorrt_version"] == "10.3.0"
    readme = (repo / "README.md").read_text()
    assert "| `triplet_image` | TensorRT 10.3.0 | no | none |" in readme and "version-compatible=true" not in readme
    write_triton_repo(out, repo, tensorrt_version="10.13.3.9", engines=False, force=True)  # ONNX: nothing to check

    fake_trt("10.3.0", inputs=[("pixels", (-1, 3, 64, 64))])
    build_bundle_engines(out, version_compatible=True)
    models = write_triton_repo(out, repo, tensorrt_version="10.13.3.9", force=True)  # a later 10.x loads it
    assert models["triplet_image"]["tensorrt"]["version_compatible"] is True
    assert "--backend-config=tensorrt,version-compatible=true" in (repo / "README.md").read_text()
    with pytest.raises(ConfigError, match="that release and later ones only"):
        write_triton_repo(out, repo, tensorrt_version="10.2", force=True)


def test_triton_repo_command(deploy_bundle, tmp_path, monkeypatch, capsys):
    from test_deploy_lint import run_cli

    out, _, _ = deploy_bundle("triplet")
    assert run_cli("triton-repo", str(out), "--out", str(tmp_path / "repo")) == 0
    assert "triplet_image (onnxruntime_onnx)" in capsys.readouterr().out
    parse(tmp_path / "repo" / "triplet_image" / "config.pbtxt")
    assert run_cli("triton-repo", str(out), "--out", str(tmp_path / "repo")) == 2
    assert "already exists; pass --force" in capsys.readouterr().err


def test_model_config_rejects_what_triton_cannot_take():
    from fine_infer.specs import GraphSpec, TensorSpec

    out = (TensorSpec("o", "float32", ("batch", 4)),)
    spec = GraphSpec("g", "embed_text", (TensorSpec("s", "string", ("batch",)),), out)
    with pytest.raises(ConfigError, match="dtype string"):
        model_config("m", spec, "onnxruntime_onnx")
    with pytest.raises(ConfigError, match="platform"):
        model_config("m", spec, "pytorch_libtorch")
    ok = GraphSpec("g", "embed_text", (TensorSpec("ids", "int64", ("batch", "sequence")),),
                   (TensorSpec("o", "float32", ("batch", 4)),))
    cfg = text_format.Parse(model_config("m", ok, "onnxruntime_onnx"), model_config_pb2.ModelConfig())
    assert list(cfg.input[0].dims) == [-1] and list(cfg.output[0].dims) == [4]
