"""ConfigBuilders: each turns one family's HF config into a `ModelConfig`.

Subclasses register themselves when they are defined. `AutoModelConfigBuilder.build(hf_config)` asks them in
reverse order of definition, so a builder a user defines later (in a notebook or a custom module map) is asked
before the built-in ones, the way a custom module map overrides the built-in map. The default builder, for
llama-like configs, is asked last.
"""

from ..errors import ConfigError


class AutoModelConfigBuilder:
    _sub_classes: list[type['AutoModelConfigBuilder']] = []
    #: the catch-all asked after every other builder; set by `register_default`
    _default: type['AutoModelConfigBuilder'] | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.register_builder(cls)

    @classmethod
    def register_builder(cls, sub_cls):
        registry = AutoModelConfigBuilder._sub_classes
        # redefining a class (re-running a notebook cell) replaces the old one instead of stacking copies
        def same(b):
            return b.__qualname__ == sub_cls.__qualname__ and b.__module__ == sub_cls.__module__
        registry[:] = [b for b in registry if not same(b)]
        registry.append(sub_cls)

    @staticmethod
    def register_default(sub_cls):
        AutoModelConfigBuilder._default = sub_cls
        return sub_cls

    @classmethod
    def condition(cls, hf_config) -> bool:
        """Whether this builder understands `hf_config`."""
        raise NotImplementedError(f'{cls.__name__}.condition is not implemented')

    @classmethod
    def builders(cls) -> list[type['AutoModelConfigBuilder']]:
        """Every registered builder in the order they are asked."""
        default = AutoModelConfigBuilder._default
        ordered = [b for b in reversed(AutoModelConfigBuilder._sub_classes) if b is not default]
        return ordered + ([default] if default is not None else [])

    @classmethod
    def find_builder(cls, hf_config) -> type['AutoModelConfigBuilder']:
        """The first builder whose condition holds."""
        for builder in cls.builders():
            if builder.condition(hf_config):
                return builder
        names = ', '.join(b.__name__ for b in cls.builders())
        raise ConfigError(f"no ConfigBuilder accepts model_type {getattr(hf_config, 'model_type', None)!r} "
                          f'(asked: {names}); define a subclass of AutoModelConfigBuilder whose condition '
                          'accepts it')

    @classmethod
    def build(cls, hf_config, model_path: str | None = None, **kwargs):
        """Called on AutoModelConfigBuilder: build with the builder that accepts `hf_config`."""
        if cls is not AutoModelConfigBuilder:
            raise NotImplementedError(f'{cls.__name__}.build is not implemented')
        builder = cls.find_builder(hf_config)
        try:
            return builder.build(hf_config, model_path=model_path, **kwargs)
        except AttributeError as e:
            field = getattr(e, 'name', None) or str(e)
            raise ConfigError(f"{builder.__name__} needs '{field}', which config.json of model_type "
                              f"{getattr(hf_config, 'model_type', None)!r} does not have; add it to config.json or "
                              'write a ConfigBuilder that reads the name this model uses') from e
