import exporter


def test_version_is_set() -> None:
    assert exporter.__version__
