"""ipywidgets, imported only when a view is built (the engine and the harness run without it)."""


def require():
    try:
        import ipywidgets
    except ImportError as e:
        raise ImportError("lmdp's notebook views need ipywidgets: pip install -e '.[notebooks]' (the data models in "
                          'lmdp.widgets work without it)') from e
    return ipywidgets


class View:
    """A view's ipywidgets box plus its data; displays as the box in a notebook."""

    widget = None

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
