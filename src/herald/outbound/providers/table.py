"""What a provider registers: its entry in the provider table (`providers/__init__.py`).

An entry is everything Herald needs to know about one push service: which subscriptions it
reaches and how their `pushChannel` is checked, what `herald app push-set` accepts for its
credentials and how they are stored and shown, and the Sender that delivers to it. The API, the
CLI, target selection and the push engine look providers up here; none of them names one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import msgspec

from herald.model import PROVIDER_OF, DevicePlatform, Provider, PushChannel
from herald.outbound.providers.keyring import Keyring
from herald.outbound.providers.sender import Sender
from herald.settings import Settings

FIELD = "pushChannel"  # the subscription property an entry's parser reads


@dataclass(frozen=True, slots=True)
class Option:
    """One option of `herald app push-set <provider>` (the CLI makes a click option of it)."""

    flag: str  # e.g. "--key-file"; the loader gets its value under `name`
    help: str
    file: bool = False  # the path of an existing file (the loader reads it)
    secret: bool = False  # prompted for without echo, so it stays out of shell history
    choices: tuple[str, ...] = ()
    default: str | None = None  # given: the option may be left out

    @property
    def name(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


class Unusable(ValueError):
    """Credentials that cannot work, refused before they are stored; names the option at fault."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True, slots=True)
class Credentials:
    """An app's credentials for one provider, as the keyring stores them. Given in this order:
    `Credentials(KIND, "One line of help.", OPTIONS, load, describe)`."""

    kind: str  # their name in the store (stored data: never rename it)
    summary: str  # the help line of `herald app push-set <provider>`
    options: tuple[Option, ...]
    load: Callable[[Mapping[str, Any]], bytes]  # option values -> what is stored; or Unusable
    describe: Callable[[bytes], dict[str, Any]]  # what `herald app push-show` prints: no secret


@dataclass(frozen=True, slots=True)
class Entry:
    """A provider, known by the push channel struct of its devices (model.py): that gives its
    `provider` and the device `platform` it reaches."""

    channel: type[PushChannel]
    # A subscription's `pushChannel` JSON -> its address; InvalidRequest naming the bad field.
    parse: Callable[[Any, Settings], PushChannel]
    credentials: Credentials
    sender: Callable[[Settings, Keyring], Sender]  # built once per process, closed at shutdown
    # Whether it carries silent pushes (state syncs, removals). A browser must show a
    # notification for every Web Push message, so web clients sync over their live stream.
    silent: bool = True

    @property
    def provider(self) -> Provider:
        return PROVIDER_OF[self.channel]

    @property
    def platform(self) -> DevicePlatform:
        """The subscriptions it reaches: the channel's JSON tag is their platform's name."""
        return DevicePlatform(str(cast(type[msgspec.Struct], self.channel).__struct_config__.tag))

    @property
    def name(self) -> str:
        """Its name on the command line (`push-set`, `push-unset`)."""
        return self.provider.value.lower()


class Table:
    """The registered providers, in registration order, found by provider, platform or name."""

    def __init__(self, *entries: Entry) -> None:
        self.entries = {e.provider: e for e in entries}
        self.platforms = {e.platform: e for e in entries}
        self.names = {e.name: e for e in entries}
        if not len(self.entries) == len(self.platforms) == len(self.names) == len(entries):
            raise ValueError("two providers share a provider, platform or name")

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries.values())

    def __getitem__(self, provider: Provider) -> Entry:
        return self.entries[provider]

    def reaching(self, platform: DevicePlatform) -> Entry | None:
        """The provider that reaches subscriptions of `platform` (None: live only)."""
        return self.platforms.get(platform)

    def senders(self, settings: Settings, keyring: Keyring) -> dict[Provider, Sender]:
        """One sender per provider, each with its own HTTP client."""
        return {e.provider: e.sender(settings, keyring) for e in self}
