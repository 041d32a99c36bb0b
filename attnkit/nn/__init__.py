"""Drop-in nn.Module layers built on attnkit ops."""

__all__: list[str] = []
