"""A model of a chosen size for the secure aggregation benchmark: parameters in 1M-value tensors."""

import torch


class FlatNet(torch.nn.Module):
    def __init__(self, n_params: int = 5_000_000, chunk: int = 1_000_000):
        super().__init__()
        self.n_params = n_params
        self.chunk = chunk
        sizes = [chunk] * (n_params // chunk) + ([n_params % chunk] if n_params % chunk else [])
        generator = torch.Generator().manual_seed(0)
        self.chunks = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(size, generator=generator) * 0.05) for size in sizes])
