"""Pure tensor math for the pruners: no nn.Module, no torch.distributed, no schedules."""
