import torch, lowbit
qw = lowbit.quantize_weight(torch.randn(64, 128), 4, 32, perm=torch.randperm(128).to(torch.int32)).to("cuda")
x = torch.randn(2, 128, device="cuda")
try:
    torch.ops.lowbit.int4_tiled_linear(x, qw.qweight, qw.scales, qw.zeros, qw.perm.cpu(), None, 32, 128, 64)
except Exception as e:
    print("raised", type(e).__name__, e)
