"""Pipeline.for_client and a class added on the running server after the client connected: the
camera's class is re-read once (the SDK's refresh_classes), as the SDK's own score does; a class the
server lacks after the refresh is still refused when the camera is added, naming it."""

from __future__ import annotations

import pytest

from promptmad.client.errors import UnknownClass
from promptmad.client.live import Pipeline, SourceConfig
from tests.live_helpers import fake_scorer


class ClassesClient:
    """The slice of AnomalyClient that for_client uses; `served` changes on the server, `known` is
    what this client read at connect and at each refresh_classes()."""

    def __init__(self, known: list[str], served: list[str]):
        self.known, self.served, self.refreshes = list(known), list(served), 0
        self.score = fake_scorer()

    def class_id(self, name: str) -> int:
        if name not in self.known:
            raise UnknownClass(f"unknown class {name!r}; served: {', '.join(self.known)}")
        return self.known.index(name)

    def refresh_classes(self) -> list[str]:
        self.refreshes += 1
        self.known = list(self.served)
        return self.known


def camera(class_name: str) -> SourceConfig:
    return SourceConfig("cam", "/nonexistent/clip.mp4", class_name, reconnect=False)


def test_a_class_added_after_connect_is_refreshed_once_not_refused():
    client = ClassesClient(["brick"], ["brick", "tile"])  # "tile" added by `promptmad classes add`
    with Pipeline.for_client(client) as line:
        line.add(camera("tile"))
        assert client.refreshes == 1 and "cam" in line.sources
        line.add(SourceConfig("cam2", "/nonexistent/clip.mp4", "brick", reconnect=False))
        assert client.refreshes == 1  # a known class costs no refresh


def test_a_class_the_server_lacks_is_refused_after_one_refresh():
    client = ClassesClient(["brick"], ["brick"])
    with Pipeline.for_client(client) as line:
        with pytest.raises(UnknownClass, match="'tyre'.*served: brick"):
            line.add(camera("tyre"))
        assert client.refreshes == 1 and line.sources == []
