"""config.load_settings: file + environment, and a clear error for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import HomeAssistantSettings, PublishSettings, base_url, load_settings
from bridge.errors import ConfigError

PIN = "913577"

GOOD = f"""
mqtt:
  host: 127.0.0.1
  port: 1884
  password: s3cret-pass
devices:
  - id: "1728053249"
    pin: "{PIN}"
    host: 127.0.0.1:8080
    name: Garage
    topic: garage
    extended: true
  - id: 1728053250
    pin: "000123"
    host: http://[::1]:8081
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_file_and_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD))
    first, second = settings.devices
    assert settings.mqtt.port == 1884 and settings.mqtt.base_topic == "smartmac"
    assert settings.mqtt.password is not None and "s3cret" not in repr(settings)
    assert (first.segment, first.display_name, first.poll_interval) == ("garage", "Garage", 6.0)
    assert (second.id, second.segment, second.display_name, second.poll_interval) == (
        "1728053250",
        "1728053250",
        "1728053250",
        60.0,
    )
    assert second.url == "http://[::1]:8081"
    assert PIN not in repr(settings) and PIN not in str(settings)


def test_home_assistant_and_publish_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD))
    assert (settings.homeassistant.discovery, settings.homeassistant.prefix) == (True, "homeassistant")
    assert (settings.publish.mode, settings.publish.heartbeat) == ("every_poll", 300)


def test_home_assistant_and_publish_from_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (
        GOOD
        + "homeassistant: {discovery: false, prefix: ha/disc}\npublish: {mode: on_change, heartbeat: 60}\n"
    )
    settings = load_settings(write(tmp_path, text))
    assert (settings.homeassistant.discovery, settings.homeassistant.prefix) == (False, "ha/disc")
    assert (settings.publish.mode, settings.publish.heartbeat) == ("on_change", 60)
    monkeypatch.setenv("SMARTMAC_HOMEASSISTANT__DISCOVERY", "true")
    monkeypatch.setenv("SMARTMAC_PUBLISH__HEARTBEAT", "120")
    settings = load_settings(write(tmp_path, text))
    assert settings.homeassistant.discovery is True and settings.homeassistant.prefix == "ha/disc"
    assert (settings.publish.mode, settings.publish.heartbeat) == ("on_change", 120)


def test_environment_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTMAC_MQTT__HOST", "broker.example")
    monkeypatch.setenv("SMARTMAC_MQTT__QOS", "1")
    monkeypatch.setenv("SMARTMAC_EMBEDDED_BROKER__PORT", "1999")
    settings = load_settings(write(tmp_path, GOOD))
    assert (settings.mqtt.host, settings.mqtt.port, settings.mqtt.qos) == ("broker.example", 1884, 1)
    assert settings.embedded_broker.port == 1999


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTMAC_CONFIG", str(write(tmp_path, GOOD)))
    assert len(load_settings().devices) == 2


def test_no_file_means_embedded_defaults() -> None:
    settings = load_settings()
    assert settings.mqtt.host is None and settings.devices == ()
    assert (settings.embedded_broker.host, settings.embedded_broker.port) == ("127.0.0.1", 1883)


def test_empty_host_from_environment_means_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTMAC_MQTT__HOST", "")
    assert load_settings().mqtt.host is None


# Broker failover (issue 11): mqtt.host is one broker or a list, `host`, `host:port`,
# `[v6]:port`, `[v6]` or a bare IPv6 address (no port); no port: mqtt.port.
@pytest.mark.parametrize(
    ("text", "brokers"),
    [
        ("mqtt: {host: broker.lan}", (("broker.lan", 1999),)),
        ("mqtt: {host: 'broker.lan:1884'}", (("broker.lan", 1884),)),
        ("mqtt: {host: '::1'}", (("::1", 1999),)),
        ("mqtt: {host: '[::1]'}", (("::1", 1999),)),
        ("mqtt: {host: '[::1]:1884'}", (("::1", 1884),)),
        ("mqtt: {host: 'fe80::1%eth0'}", (("fe80::1%eth0", 1999),)),
        ("mqtt: {host: [a, 'b:1884']}", (("a", 1999), ("b", 1884))),
        ("mqtt: {host: ['[::1]:1885', '::1', 10.0.0.2]}", (("::1", 1885), ("::1", 1999), ("10.0.0.2", 1999))),
        ("mqtt:\n  host:\n    - a\n    - 'b:1884'\n", (("a", 1999), ("b", 1884))),
        ("mqtt: {host: 'a,b:1884'}", (("a", 1999), ("b", 1884))),
        ("mqtt: {host: [a]}", (("a", 1999),)),
        ("mqtt: {host: []}", ()),
        ("mqtt: {host: ''}", ()),
        ("mqtt: {host: null}", ()),
        ("mqtt: {}", ()),
    ],
)
def test_broker_lists_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, brokers: tuple[tuple[str, int], ...]
) -> None:
    monkeypatch.setenv("SMARTMAC_MQTT__PORT", "1999")
    settings = load_settings(write(tmp_path, text))
    assert settings.mqtt.brokers == brokers
    # No broker is the embedded one's case, as before.
    assert (settings.mqtt.host is None) == (not brokers)


@pytest.mark.parametrize(
    ("value", "brokers"),
    [
        ('["a", "b:1884"]', (("a", 1999), ("b", 1884))),  # JSON, as for SMARTMAC_DEVICES
        ('["[::1]:1885", "::1"]', (("::1", 1885), ("::1", 1999))),
        ("a,b:1884", (("a", 1999), ("b", 1884))),  # the short form
        (" a , [::1]:1885 ,::1 ", (("a", 1999), ("::1", 1885), ("::1", 1999))),
        ("broker.lan", (("broker.lan", 1999),)),
        ("broker.lan:1884", (("broker.lan", 1884),)),
        ("::1", (("::1", 1999),)),
        ("[::1]:1884", (("::1", 1884),)),
        ("", ()),
        ("[]", ()),
    ],
)
def test_broker_lists_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, brokers: tuple[tuple[str, int], ...]
) -> None:
    monkeypatch.setenv("SMARTMAC_MQTT__HOST", value)
    monkeypatch.setenv("SMARTMAC_MQTT__PORT", "1999")
    settings = load_settings()
    assert settings.mqtt.brokers == brokers
    assert (settings.mqtt.host is None) == (not brokers)


def test_the_environment_list_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTMAC_MQTT__HOST", "a:1,b:2")
    assert load_settings(write(tmp_path, GOOD)).mqtt.brokers == (("a", 1), ("b", 2))


# "zq" marks the value, which the message must not echo.
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("zq,", "entry 2 of 2: empty entry"),
        ("zq, ,zq", "entry 2 of 3: empty entry"),
        ('["zq", ""]', "entry 2 of 2: empty entry"),
        ('["zq", 1883]', "entry 2 of 2: must be text"),
        ('{"zq": 1}', "must be a host, host:port, or a list of them"),
        ("1883", "must be a host, host:port, or a list of them"),  # JSON: a number
        ("zq:0", "port must be a number from 1 to 65535"),
        ("zq:65536", "port must be a number from 1 to 65535"),
        ("zq:", "port must be a number from 1 to 65535"),
        ("zq:x", "port must be a number from 1 to 65535"),
        ("zq:1" + "0" * 5000, "port must be a number from 1 to 65535"),
        ("zq,zq:99999", "entry 2 of 2: port must be"),
        ("[::1]:0", "port must be a number from 1 to 65535"),
        (":1883", "no host name"),
        ("zq\tzq", "must not contain spaces, control characters"),
        ("zq zq", "must not contain spaces"),
        ("zq\x7f", "must not contain spaces, control characters"),
        ("zq\udcff", "must not contain spaces, control characters"),
        ("mqtt://zq", "give host or host:port only"),
        ("zq/zq", "give host or host:port only"),
        ("user@zq", "give host or host:port only"),
        ("[zq]:1883", "brackets hold an IPv6 address"),
        ("[::1:1883", "brackets hold an IPv6 address"),
        ("[::1]zq", "give \\[address\\]:port"),
        ("zq:zq:1883", "an IPv6 address with a port is written"),
        ("zq,zq", "entry 2 of 2 is the same broker as entry 1"),
        ("zq:1883,zq2,zq", "entry 3 of 3 is the same broker as entry 1"),
    ],
)
def test_bad_broker_entries_name_mqtt_host(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv("SMARTMAC_MQTT__HOST", value)
    with pytest.raises(ConfigError, match=rf"\n  mqtt\.host: {message}") as info:
        load_settings()
    assert "zq" not in str(info.value)


def test_a_bad_broker_entry_in_the_file_names_mqtt_host(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\n  mqtt\.host: entry 3 of 3: port must be") as info:
        load_settings(write(tmp_path, "mqtt: {host: [zq, 'zq:1884', 'zq:0']}"))
    assert "zq" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mqtt: {hots: x}", "mqtt.hots: unknown key"),
        ("bogus: 1", "bogus: unknown key"),
        ("mqtt: {port: 0}", "mqtt.port"),
        ("mqtt: {qos: 3}", "mqtt.qos"),
        ("mqtt: {base_topic: 'a/#'}", "mqtt.base_topic"),
        ("mqtt: {base_topic: '/a'}", "mqtt.base_topic"),
        ("mqtt: {tls: {enabled: true, ca_certs: /nonexistent/ca.pem}}", "mqtt.tls.ca_certs: file not found"),
        ("devices: [{id: '12a', pin: '1', host: h}]", "devices.0.id: must be the meter's devid"),
        ("devices: [{id: '1', pin: 12345, host: h}]", "devices.0.pin: must be a quoted string"),
        (
            "devices: [{id: '1', pin: 'x', host: h, interval: 30}]",
            "devices.0.interval: 30 s is below the 60 s a standard meter allows",
        ),
        (
            "devices: [{id: '1', pin: 'x', host: h, extended: true, interval: 5}]",
            "devices.0.interval: 5 s is below the 6 s an extended",
        ),
        (
            "devices: [{id: '1', pin: 'x', host: h, topic: bridge}]",
            "devices.0.topic: 'bridge' and 'bridge-<digits>' are reserved",
        ),
        ("devices: [{id: '1', pin: 'x', host: h, topic: 'a/b'}]", "devices.0.topic"),
        ("devices: [{id: '1', pin: 'x', host: 'https://h'}]", "devices.0.host: the meter speaks plain http"),
        ("devices: [{id: '1', pin: 'x', host: 'h:99999'}]", "devices.0.host: port"),
        ("devices: [{id: '1', pin: 'x', host: 'h/path'}]", "devices.0.host"),
        (
            "devices: [{id: '1', pin: 'x', host: '127.0.0.1:0'}]",
            "devices.0.host: port must be a number from 1 to 65535",
        ),
        ("devices: [{id: '1', pin: 'x', host: 'http://[::1]:0'}]", "devices.0.host: port must be"),
        ("devices: [{id: '1', pin: 'x', host: 'h:'}]", "devices.0.host: port must be"),
        (
            "devices: [{id: '1', pin: 'x', host: 'http://:pw@h'}]",
            "devices.0.host: give host or host:port only",
        ),
        ("devices: [{id: '1', pin: 'x', host: 'http://u@h'}]", "devices.0.host: give host or host:port only"),
        ("devices: [{id: '1', pin: '', host: h}]", "devices.0.pin: must be non-empty"),
        (r'devices: [{id: "1", pin: "x\ty", host: h}]', "devices.0.pin: must be non-empty, without control"),
        ("devices: [{id: '1', pin: 'x', host: h, timeout: 0}]", "devices.0.timeout"),
        ("devices: [{id: '1', pin: 'x', host: h, timeout: .nan}]", "devices.0.timeout"),
        ("devices: [{id: '1', pin: 'x', host: h, interval: .nan}]", "devices.0.interval"),
        ("devices: [{id: '1', pin: 'x', host: h, interval: .inf}]", "devices.0.interval"),
        ("devices: [{id: '1', pin: 'x', host: h, interval: 1e10}]", "devices.0.interval"),
        ("devices: [{id: '1', pin: 'x'}]", "devices.0.host: Field required"),
        (
            "devices: [{id: '1', pin: 'x', host: h}, {id: '1', pin: 'y', host: h, topic: t}]",
            "devices.1.id '1' is also used by devices.0",
        ),
        (
            "devices: [{id: '1', pin: 'x', host: h, topic: t}, {id: '2', pin: 'y', host: h, topic: t}]",
            "devices.1.topic 't' is also used",
        ),
        ("homeassistant: {prefix: 'ha/#'}", "homeassistant.prefix: must not contain"),
        ("homeassistant: {prefix: ''}", "homeassistant.prefix: must be non-empty"),
        ("homeassistant: {discovery: maybe}", "homeassistant.discovery"),
        ("homeassistant: {prefx: ha}", "homeassistant.prefx: unknown key"),
        ("publish: {mode: sometimes}", "publish.mode: Input should be 'every_poll' or 'on_change'"),
        ("publish: {heartbeat: 0}", "publish.heartbeat"),
        ("publish: {heartbeat: .inf}", "publish.heartbeat"),
        ("publish: {heartbeat: 1e10}", "publish.heartbeat"),
        ("- just a list", "top level must be a mapping"),
        ("mqtt: {port: [", "not valid YAML"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as info:
        load_settings(write(tmp_path, text))
    assert "'x'" not in str(info.value)  # the PIN given in these cases is never echoed


# Topic settings a broker refuses (mosquitto refused every connection with a tab in the
# base topic, and dropped the connection once a second for the others): each is refused at
# load, naming the key, with the topic rule data keys get (topics.valid_level). "zq" marks
# the value, which the message must not echo.
@pytest.mark.parametrize(
    ("text", "key"),
    [
        (r'mqtt: {base_topic: "zq\tzq"}', "mqtt.base_topic"),
        (r'mqtt: {base_topic: "zq/\x7f"}', "mqtt.base_topic"),
        (r'mqtt: {base_topic: "zq\x85zq"}', "mqtt.base_topic"),
        (r'mqtt: {base_topic: "zq/\x00"}', "mqtt.base_topic"),
        (r'mqtt: {base_topic: "zq/+"}', "mqtt.base_topic"),
        (r'mqtt: {base_topic: "zq\uD800"}', "mqtt.base_topic"),
        ("mqtt: {base_topic: " + "zq" * 129 + "}", "mqtt.base_topic"),
        (r'homeassistant: {prefix: "zq\uFFFF"}', "homeassistant.prefix"),
        (r'homeassistant: {prefix: "zq/\uFDD0"}', "homeassistant.prefix"),
        (r'homeassistant: {prefix: "zq\U0001FFFE"}', "homeassistant.prefix"),
        (r'devices: [{id: "1", pin: "x", host: h, topic: "zq\x1bzq"}]', "devices.0.topic"),
        (r'devices: [{id: "1", pin: "x", host: h, topic: "zq\uFFFE"}]', "devices.0.topic"),
        (r'devices: [{id: "1", pin: "x", host: h, topic: "zq#"}]', "devices.0.topic"),
        ("devices: [{id: '1', pin: 'x', host: h, topic: " + "zq" * 129 + "}]", "devices.0.topic"),
        (r'mqtt: {client_id: "zq\tzq"}', "mqtt.client_id"),
        (r'mqtt: {client_id: "zq\x00"}', "mqtt.client_id"),
        (r'mqtt: {client_id: "zq\x9f"}', "mqtt.client_id"),
        (r'mqtt: {client_id: "zq\uFFFF"}', "mqtt.client_id"),
        (r'mqtt: {client_id: "zq\uDC80"}', "mqtt.client_id"),
        (r'mqtt: {client_id: "zq+"}', "mqtt.client_id"),
        (r'mqtt: {client_id: "zq#"}', "mqtt.client_id"),
        ("mqtt: {client_id: " + "zq" * 65 + "}", "mqtt.client_id"),
    ],
)
def test_topic_settings_a_broker_refuses(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"\n  {key}: ") as info:
        load_settings(write(tmp_path, text))
    assert "zq" not in str(info.value)


def test_topic_settings_a_broker_accepts(tmp_path: Path) -> None:
    # Spaces, '$' after the first level, non-ASCII letters and astral characters are fine.
    text = "homeassistant: {prefix: 'ha/Zähler $1'}\nmqtt: {base_topic: 'b/\U0001f50c', client_id: 'a/b c'}\n"
    settings = load_settings(write(tmp_path, text))
    assert settings.homeassistant.prefix == "ha/Zähler $1"
    assert (settings.mqtt.base_topic, settings.mqtt.client_id) == ("b/\U0001f50c", "a/b c")


def test_a_lone_surrogate_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # A byte that is not UTF-8 in a variable reaches Python as a lone surrogate.
    monkeypatch.setenv("SMARTMAC_MQTT__BASE_TOPIC", "zq\udcff")
    with pytest.raises(ConfigError, match=r"mqtt\.base_topic: must not contain") as info:
        load_settings()
    assert "zq" not in str(info.value)


def test_secret_values_are_never_echoed(tmp_path: Path) -> None:
    text = f"devices: [{{id: '1', pin: '{PIN}', host: h, bogus: '{PIN}'}}]\nmqtt: {{password: [{PIN}]}}"
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert PIN not in str(info.value)


def test_unknown_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTMAC_MQQT__HOST", "x")
    with pytest.raises(ConfigError, match="SMARTMAC_MQQT__HOST"):
        load_settings()


def test_devices_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTMAC_DEVICES", f'[{{"id": "17", "pin": "{PIN}", "host": "h"}}]')
    assert load_settings().devices[0].id == "17"


def test_bad_json_in_the_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTMAC_DEVICES", f'[{{"id": "17", "pin": "{PIN}"')
    with pytest.raises(ConfigError, match="devices") as info:
        load_settings()
    assert PIN not in str(info.value)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"mqtt: {host: h}\ndevices: [{id: '1', pin: '\xe9t\xe9', host: h}]\n")
    with pytest.raises(ConfigError, match=r"config\.yaml line 2: not UTF-8 text$"):
        load_settings(path)


def test_any_pin_text_is_accepted(tmp_path: Path) -> None:
    # The PIN is percent-encoded into the query (meter.py), so '+&#%' and spaces are fine.
    settings = load_settings(write(tmp_path, "devices: [{id: '1', pin: 'a+b&c#d%e f?', host: h}]"))
    assert settings.devices[0].pin.get_secret_value() == "a+b&c#d%e f?"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("192.168.4.1", "http://192.168.4.1"),
        ("meter.local:8080", "http://meter.local:8080"),
        ("http://meter.local:8080/", "http://meter.local:8080"),
        ("[::1]:80", "http://[::1]:80"),
        ("::1", None),
    ],
)
def test_base_url(host: str, url: str | None) -> None:
    if url is None:
        with pytest.raises(ValueError):
            base_url(host)
    else:
        assert base_url(host) == url


def test_the_shipped_example_is_valid() -> None:
    settings = load_settings(Path(__file__).parent.parent / "examples" / "config.yaml")
    assert [d.segment for d in settings.devices] == ["garage", "1728053250"]


def test_readme_config_block_is_valid(tmp_path: Path) -> None:
    # README's configuration example is the contract: it must load exactly as printed.
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    settings = load_settings(write(tmp_path, block))
    assert settings.devices[0].poll_interval == 60 and settings.mqtt.host == "127.0.0.1"
    assert settings.homeassistant == HomeAssistantSettings()  # the defaults, as printed
    assert settings.publish == PublishSettings()


def test_http_defaults_serve_nothing() -> None:
    http = load_settings().http
    assert (http.port, http.host, http.username, http.password, http.read_only) == (
        None,
        "127.0.0.1",
        None,
        None,
        False,
    )
    assert http.loopback and http.public_url is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"])
def test_a_loopback_host_needs_no_password(tmp_path: Path, host: str) -> None:
    settings = load_settings(write(tmp_path, f"http: {{port: 8099, host: '{host}'}}\n"))
    assert settings.http.loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "meter-bridge.example", ""])
def test_a_host_others_reach_needs_a_password_or_read_only(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match=r"http\.host: not a loopback address"):
        load_settings(write(tmp_path, f"http: {{port: 8099, host: '{host}'}}\n"))
    with_password = load_settings(write(tmp_path, f"http: {{host: '{host}', password: hunter2-x}}\n"))
    assert with_password.http.password is not None
    assert load_settings(write(tmp_path, f"http: {{host: '{host}', read_only: true}}\n")).http.read_only


def test_http_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTMAC_HTTP__PORT", "8123")
    monkeypatch.setenv("SMARTMAC_HTTP__PASSWORD", "hunter2-x")
    http = load_settings().http
    assert http.port == 8123 and http.password is not None
    assert http.password.get_secret_value() == "hunter2-x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http: {port: 0}", "http.port"),
        ("http: {port: 70000}", "http.port"),
        ("http: {username: admin}", "http.password: http.username needs a password"),
        ("http: {public_url: 'ftp://x'}", "http.public_url: must be an http:// or https:// URL"),
        ("http: {public_url: 'bridge.example'}", "http.public_url"),
        ("http: {colour: red}", "http.colour: unknown key"),
    ],
)
def test_bad_http_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, text + "\n"))


def test_the_http_password_is_never_echoed(tmp_path: Path) -> None:
    text = "http: {host: 0.0.0.0, username: admin, password: [Sesame-77]}\n"
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert "Sesame-77" not in str(caught.value) and "http.password" in str(caught.value)
