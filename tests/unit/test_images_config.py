"""The process an image runs, by the container-runtime rules (Docker's and runc's)."""

from __future__ import annotations

import pytest

from zoned.images.errors import InvalidImage
from zoned.images.imageconfig import (
    DEFAULT_PATH,
    Accounts,
    GroupEntry,
    ImageConfig,
    PasswdEntry,
    merge_env,
    parse_group,
    parse_passwd,
    process_for,
    request_process,
    resolve_user,
)
from zoned.images.oci import ContainerConfig

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment
broken line
app:x:1000:1000:App:/home/app:/bin/sh
nohome:x:1001:1001:::/bin/sh
badid:x:abc:1:::
"""
GROUP = """\
root:x:0:
daemon:x:1:
app:x:1000:
staff:x:50:app,other
audio:x:29:app
video:x:44:other
"""
ACCOUNTS = Accounts(users=parse_passwd(PASSWD), groups=parse_group(GROUP))


def test_account_files_parse_like_libc() -> None:
    assert [u.name for u in ACCOUNTS.users] == ["root", "daemon", "app", "nohome"]
    assert ACCOUNTS.users[2] == PasswdEntry("app", 1000, 1000, "/home/app")
    assert ACCOUNTS.users[3].home == "/"
    assert GroupEntry("staff", 50, ["app", "other"]) in ACCOUNTS.groups


@pytest.mark.parametrize(
    ("spec", "uid", "gid", "extra", "home"),
    [
        ("", 0, 0, [], "/root"),
        ("root", 0, 0, [], "/root"),
        ("app", 1000, 1000, [29, 50], "/home/app"),  # supplementary groups by membership
        ("1000", 1000, 1000, [29, 50], "/home/app"),  # a uid in passwd is that user
        ("4242", 4242, 0, [], "/"),  # a uid not in passwd: gid 0, home /
        ("app:staff", 1000, 50, [], "/home/app"),  # an explicit group: no supplementary ones
        ("app:77", 1000, 77, [], "/home/app"),  # a numeric group need not exist
        ("4242:4343", 4242, 4343, [], "/"),
        ("daemon:video", 1, 44, [], "/usr/sbin"),
    ],
)
def test_user_names_resolve_against_the_image(
    spec: str, uid: int, gid: int, extra: list[int], home: str
) -> None:
    user = resolve_user("img", spec, ACCOUNTS)
    assert (user.uid, user.gid, user.additional_gids, user.home) == (uid, gid, extra, home)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("nobody", "user 'nobody' is not in the image's /etc/passwd"),
        ("app:nogroup", "group 'nogroup' is not in the image's /etc/group"),
        (":staff", "is not user[:group]"),
        ("app:", "is not user[:group]"),
        ("99999999999", "is not in the image's /etc/passwd"),  # beyond 2^31-1
    ],
)
def test_unknown_users_and_groups_are_refused_naming_the_image(spec: str, problem: str) -> None:
    with pytest.raises(InvalidImage) as caught:
        resolve_user("registry.example/app:1", spec, ACCOUNTS)
    assert caught.value.code == "invalid_request"
    assert caught.value.message.startswith("image registry.example/app:1: ")
    assert problem in caught.value.message


def test_an_image_without_account_files_runs_numeric_users_only() -> None:
    assert resolve_user("img", "123:456", Accounts()).uid == 123
    with pytest.raises(InvalidImage, match="not in the image's /etc/passwd"):
        resolve_user("img", "app", Accounts())


def config(**fields: object) -> ImageConfig:
    return ImageConfig.from_container_config(ContainerConfig(**fields))  # type: ignore[arg-type]


def test_default_command_is_entrypoint_then_cmd() -> None:
    image = config(Entrypoint=["/init", "--"], Cmd=["serve", "-v"])
    assert process_for("img", image, ACCOUNTS).argv == ["/init", "--", "serve", "-v"]


def test_arguments_replace_cmd_but_keep_the_entrypoint() -> None:
    image = config(Entrypoint=["/init", "--"], Cmd=["serve", "-v"])
    assert process_for("img", image, ACCOUNTS, args=["sh", "-c", "id"]).argv == [
        "/init",
        "--",
        "sh",
        "-c",
        "id",
    ]
    plain = config(Cmd=["bash"])
    assert process_for("img", plain, ACCOUNTS, args=["python3", "-V"]).argv == [
        "python3",
        "-V",
    ]


def test_empty_arguments_keep_the_image_cmd() -> None:
    image = config(Cmd=["bash"])
    assert process_for("img", image, ACCOUNTS, args=[]).argv == ["bash"]


def test_overriding_the_entrypoint_drops_the_image_cmd() -> None:
    image = config(Entrypoint=["/init"], Cmd=["serve"])
    assert process_for("img", image, ACCOUNTS, entrypoint=["/bin/sh"]).argv == ["/bin/sh"]
    assert process_for(
        "img", image, ACCOUNTS, entrypoint=["/bin/sh"], args=["-c", "true"]
    ).argv == ["/bin/sh", "-c", "true"]
    assert process_for("img", image, ACCOUNTS, entrypoint=[], args=["ls"]).argv == ["ls"]


def test_no_command_at_all_is_an_error() -> None:
    with pytest.raises(InvalidImage, match="no command"):
        process_for("img", config(), ACCOUNTS)
    with pytest.raises(InvalidImage, match="no command"):
        process_for("img", config(Cmd=["x"]), ACCOUNTS, entrypoint=[])


def test_env_is_merged_by_name_with_path_and_home_defaults() -> None:
    image = config(Env=["LANG=C.UTF-8", "MODE=image", "EMPTY="], Cmd=["x"], User="app")
    spec = process_for("img", image, ACCOUNTS, env=["MODE=run", "EXTRA=1"])
    assert spec.env == [
        f"PATH={DEFAULT_PATH}",
        "HOME=/home/app",
        "LANG=C.UTF-8",
        "MODE=run",
        "EMPTY=",
        "EXTRA=1",
    ]
    own = process_for("img", config(Env=["PATH=/opt/bin"], Cmd=["x"]), ACCOUNTS, env=["HOME=/w"])
    assert own.env == ["PATH=/opt/bin", "HOME=/w"]


def test_env_overrides_must_be_name_value() -> None:
    with pytest.raises(InvalidImage, match="not NAME=value"):
        process_for("img", config(Cmd=["x"]), ACCOUNTS, env=["JUSTANAME"])
    with pytest.raises(InvalidImage, match="not NAME=value"):
        process_for("img", config(Cmd=["x"]), ACCOUNTS, env=["=value"])


def test_merge_env_keeps_first_positions() -> None:
    assert merge_env(["A=1", "B=2"], ["B=3", "C=4", "A=5"]) == ["A=5", "B=3", "C=4"]


@pytest.mark.parametrize(
    ("working_dir", "override", "cwd"),
    [("", None, "/"), ("/srv/app", None, "/srv/app"), ("rel", None, "/rel"), ("/a", "/b", "/b")],
)
def test_working_dir_defaults_to_root(working_dir: str, override: str | None, cwd: str) -> None:
    image = config(WorkingDir=working_dir, Cmd=["x"])
    assert process_for("img", image, ACCOUNTS, working_dir=override).cwd == cwd


def test_user_override_replaces_the_image_user() -> None:
    image = config(User="app", Cmd=["x"])
    assert process_for("img", image, ACCOUNTS).uid == 1000
    spec = process_for("img", image, ACCOUNTS, user="0:0")
    assert (spec.uid, spec.gid, spec.additional_gids) == (0, 0, [])


def test_config_nulls_are_empty() -> None:
    image = ImageConfig.from_container_config(None)
    assert image == ImageConfig()
    assert config(Entrypoint=None, Cmd=None).entrypoint == []


def _request(image: ImageConfig, **fields: object) -> list[str]:
    values: dict[str, object] = {
        "argv": [],
        "entrypoint": None,
        "env": {},
        "working_dir": None,
        "user": None,
        "whole_command": False,
    }
    values.update(fields)
    return request_process("img", image, ACCOUNTS, **values).argv  # type: ignore[arg-type]


def test_a_run_replaces_cmd_an_exec_is_the_whole_command() -> None:
    image = config(Entrypoint=["/init"], Cmd=["serve"])
    # docker run IMAGE / docker run IMAGE ARGS
    assert _request(image) == ["/init", "serve"]
    assert _request(image, argv=["ls"]) == ["/init", "ls"]
    # docker exec CONTAINER CMD: no entrypoint before it; none at all runs the image's.
    assert _request(image, argv=["ls"], whole_command=True) == ["ls"]
    assert _request(image, whole_command=True) == ["/init", "serve"]
    # An entrypoint given is honoured either way.
    assert _request(image, argv=["-V"], entrypoint=["python3"], whole_command=True) == [
        "python3",
        "-V",
    ]


def test_a_request_takes_the_images_settings_under_its_own() -> None:
    image = config(Cmd=["sh"], Env=["A=image", "B=image"], WorkingDir="/srv", User="app")
    spec = request_process(
        "img",
        image,
        ACCOUNTS,
        argv=[],
        entrypoint=None,
        env={"B": "request"},
        working_dir=None,
        user=None,
        whole_command=True,
    )
    assert (spec.cwd, spec.uid, spec.gid, spec.additional_gids) == ("/srv", 1000, 1000, [29, 50])
    assert "A=image" in spec.env and "B=request" in spec.env and "HOME=/home/app" in spec.env
    root = request_process(
        "img",
        image,
        ACCOUNTS,
        argv=["id"],
        entrypoint=None,
        env={},
        working_dir="/tmp",
        user="root",
        whole_command=True,
    )
    assert (root.cwd, root.uid, root.gid, root.argv) == ("/tmp", 0, 0, ["id"])
