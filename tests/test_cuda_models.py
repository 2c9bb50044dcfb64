"""The FLUX.1 models on the GPU: loaded straight to the device, and equal to the same
models on the CPU (tiny presets, TF32 off; errors relative to the output's largest
value, bounds stated per test).

Run with the device tool: `pytest -m cuda tests/test_cuda_models.py`."""

import pytest
import torch
from safetensors.torch import save_file

from models import autoencoder, clip, t5
from models.flux import PRESETS, Flux, image_ids, text_ids
from models.flux_files import load_clip, load_flux_ae, load_flux_transformer, load_t5

pytestmark = pytest.mark.cuda
REL = 1e-5  # fp32 GPU vs fp32 CPU: the AE and text encoders


def assert_close(out, ref, what, rel=REL):
    err, scale = (out.cpu() - ref).abs().max().item(), ref.abs().max().item()
    print(f"{what}: max abs error {err:.3g}, largest value {scale:.3g}")
    assert err <= rel * scale, what


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def saved(tmp_path, model, name):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model.eval(), path


def on_cuda(model):
    return all(t.device.type == "cuda" for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def test_flux_transformer(tmp_path):
    """fp64 on the GPU equals fp64 on the CPU to 1e-9 (relative to the largest value):
    the model does the same arithmetic on both. fp32, on either device, is within 1e-4
    of fp64. The fp32 timestep embedding (as BFL and diffusers compute it) is the loose
    part: the sines' arguments reach 1000 radians, so one ulp of fp32 moves them by
    ~1e-4; these random weights amplify that to 3e-5 to 6e-5 of the output (measured
    on H100 and on the CPU)."""
    cpu, path = saved(tmp_path, Flux(PRESETS["tiny"]), "flux.safetensors")
    g = torch.Generator().manual_seed(1)
    x = dict(
        img=torch.randn(2, 15, 64, generator=g),
        img_ids=image_ids(3, 5, 2) * 0.5,
        txt=torch.randn(2, 7, 64, generator=g),
        txt_ids=text_ids(7, 2),
        timesteps=torch.tensor([0.5, 0.25]),  # 1000·t and 1000·g exact in bf16
        y=torch.randn(2, 64, generator=g),
        guidance=torch.tensor([4.0, 2.0]),
    )

    def cast(dtype, device):
        return {k: v.to(device, dtype) for k, v in x.items()}

    ref = cpu.double()(**cast(torch.float64, "cpu"))
    out32 = {}
    for dtype, rel in [(torch.float64, 1e-9), (torch.float32, 1e-4)]:
        gpu = load_flux_transformer(path, config=PRESETS["tiny"], device="cuda", dtype=dtype)
        assert on_cuda(gpu)
        out = gpu(**cast(dtype, "cuda"))
        assert_close(out.double(), ref, f"flux {dtype}", rel)
        out32[dtype] = out
    cpu32 = cpu.float()(**cast(torch.float32, "cpu"))
    assert_close(cpu32.double(), ref, "flux float32 on the CPU", 1e-4)
    bf16 = load_flux_transformer(path, config=PRESETS["tiny"], device="cuda", dtype=torch.bfloat16)
    out16 = bf16(**{k: (v.cuda().bfloat16() if v.is_floating_point() else v) for k, v in x.items()})
    assert out16.dtype == torch.bfloat16
    rel = ((out16.double().cpu() - ref).norm() / ref.norm()).item()
    print(f"flux bf16: relative L2 error {rel:.3g}")
    assert rel <= 3e-2


@torch.no_grad()
def test_autoencoder_tiled(tmp_path):
    cfg = autoencoder.PRESETS["tiny"]
    cpu, path = saved(tmp_path, autoencoder.AutoEncoder(cfg), "ae.safetensors")
    gpu = load_flux_ae(path, config=cfg, device="cuda", dtype=torch.float32)
    assert on_cuda(gpu)
    z = torch.randn(1, 16, 20, 28, generator=torch.Generator().manual_seed(2))
    ref = cpu.decode_tiled(z, tile=12, overlap=4)
    out = gpu.decode_tiled(z.cuda(), tile=12, overlap=4)
    assert_close(out, ref, "ae decode_tiled")
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert_close(gpu.encode(x.cuda()), cpu.encode(x), "ae encode")


@torch.no_grad()
def test_text_encoders(tmp_path):
    ids = torch.randint(0, 999, (2, 77), generator=torch.Generator().manual_seed(4))
    ids[:, 20:] = 999  # EOS (the largest id) and its padding
    cfg = clip.PRESETS["tiny"]
    cpu, path = saved(tmp_path, clip.CLIPTextEncoder(cfg), "clip.safetensors")
    gpu = load_clip(path, config=cfg, device="cuda", dtype=torch.float32)
    assert on_cuda(gpu)
    assert_close(gpu(ids.cuda()), cpu(ids), "clip pooled")
    cfg = t5.PRESETS["tiny"]
    cpu, path = saved(tmp_path, t5.T5Encoder(cfg), "t5.safetensors")
    gpu = load_t5(path, config=cfg, device="cuda", dtype=torch.float32)
    assert on_cuda(gpu)
    assert_close(gpu(ids[:, :40].cuda()), cpu(ids[:, :40]), "t5")


@torch.no_grad()
def test_fused_elementwise_equals_eager(tmp_path, monkeypatch):
    """The compiled norm / RoPE / modulation kernels compute what the eager ops do:
    fp32 to 1e-5 of the output's largest value, bf16 to 1e-2 relative L2."""
    import models.flux as flux

    cpu, path = saved(tmp_path, Flux(PRESETS["tiny"]), "flux.safetensors")
    g = torch.Generator().manual_seed(5)
    x = dict(
        img=torch.randn(2, 15, 64, generator=g),
        img_ids=image_ids(3, 5, 2),
        txt=torch.randn(2, 7, 64, generator=g),
        txt_ids=text_ids(7, 2),
        timesteps=torch.tensor([0.5, 0.25]),
        y=torch.randn(2, 64, generator=g),
        guidance=torch.tensor([4.0, 2.0]),
    )
    for dtype in (torch.float32, torch.bfloat16):
        gpu = load_flux_transformer(path, config=PRESETS["tiny"], device="cuda", dtype=dtype)
        xd = {k: v.to("cuda", dtype) for k, v in x.items()}
        fused = gpu(**xd).float()
        monkeypatch.setattr(flux, "FUSE_ON_GPU", False)
        eager = gpu(**xd).float()
        monkeypatch.setattr(flux, "FUSE_ON_GPU", True)
        if dtype == torch.float32:
            assert_close(fused.cpu().double(), eager.cpu().double(), "fused fp32", 1e-5)
        else:
            rel = ((fused - eager).norm() / eager.norm()).item()
            print(f"fused bf16: relative L2 {rel:.3g}")
            assert rel <= 1e-2


@torch.no_grad()
def test_wan_models(tmp_path, monkeypatch):
    """Wan transformer (per-token timesteps, fused kernels on and off), Wan VAE (tiled,
    streamed) and umT5 on the GPU against the CPU, fp32 (relative to the largest value:
    transformer 1e-4 (fp32 kernels, as for FLUX), VAE and umT5 1e-5)."""
    import models.flux as flux
    from models import umt5, wan, wan_vae
    from models.wan_files import load_umt5, load_wan_transformer, load_wan_vae

    cfg = wan.PRESETS["tiny"]
    cpu, path = saved(tmp_path, wan.Wan(cfg), "wan.safetensors")
    gpu = load_wan_transformer(path, config=cfg, device="cuda", dtype=torch.float32)
    assert on_cuda(gpu)
    g = torch.Generator().manual_seed(6)
    latent = torch.randn(2, 16, 3, 4, 6, generator=g)
    context = torch.randn(2, 5, cfg.text_dim, generator=g)
    t = torch.tensor([250.0, 900.0])
    ref = cpu(latent, t, context)
    for fuse in (True, False):
        monkeypatch.setattr(flux, "FUSE_ON_GPU", fuse)
        out = gpu(latent.cuda(), t.cuda(), context.cuda())
        assert_close(out, ref, f"wan fused={fuse}", 1e-4)
    tokens, grid = wan.patchify(latent, cfg.patch_size)
    per_token = torch.where(torch.arange(tokens.shape[1]) < 6, 0.0, 900.0).expand(2, -1)
    ids = wan.video_ids(*grid, batch=2)
    ref = cpu(tokens, per_token, context, ids)
    out = gpu(tokens.cuda(), per_token.cuda(), context.cuda(), ids.cuda())
    assert_close(out, ref, "wan per-token t", 1e-4)

    vcfg = wan_vae.PRESETS["tiny"]
    cpu, path = saved(tmp_path, wan_vae.WanVAE(vcfg), "vae.safetensors")
    gpu = load_wan_vae(path, config=vcfg, device="cuda", dtype=torch.float32)
    z = torch.randn(1, 16, 3, 10, 12, generator=g) * 0.1
    ref = cpu.decode_video(z, tile=6, overlap=2)
    for fuse in (True, False):  # the compiled norm / upsample kernels, and eager
        monkeypatch.setattr(flux, "FUSE_ON_GPU", fuse)
        for chunk in (1, 2):
            out = gpu.decode_video(z.cuda(), tile=6, overlap=2, chunk=chunk)
            assert_close(out, ref, f"wan vae decode_video fused={fuse} chunk={chunk}")
    video = torch.rand(1, 3, 9, 32, 48, generator=g) * 2 - 1
    ref = cpu.encode_video(video, tile=3, overlap=1)
    assert_close(gpu.encode_video(video, tile=3, overlap=1), ref, "wan vae encode_video")
    assert_close(gpu.encode(video.cuda()), cpu.encode(video), "wan vae encode")
    half = gpu.to(torch.bfloat16)  # bf16 on the GPU against fp32: mean abs error < 1e-2
    err = (
        half.decode_video(z.cuda(), tile=6, overlap=2).float()
        - cpu.decode_video(z, tile=6, overlap=2)
    ).abs()
    assert err.mean() < 1e-2, err.mean()

    ucfg = umt5.PRESETS["tiny"]
    cpu, path = saved(tmp_path, umt5.UMT5Encoder(ucfg), "umt5.safetensors")
    gpu = load_umt5(path, config=ucfg, device="cuda", dtype=torch.float32)
    ids = torch.randint(0, ucfg.vocab_size, (2, 24), generator=g)
    mask = (torch.arange(24) < torch.tensor([[24], [9]])).long()
    assert_close(gpu(ids.cuda(), mask.cuda()), cpu(ids, mask), "umt5")
