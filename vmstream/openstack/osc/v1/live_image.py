"""`openstack live-image create|start|list|servers|delete`: cobalt's verbs over Nova and Glance.

Each command checks its input before its first request (a bad --count, --param or --user-data
starts nothing), then calls the client (client_manager.vmstream, made by plugin.make_client).
vmstream errors become osc's CommandError, which osc prints as the message alone (exit 1).
"""

from __future__ import annotations

import argparse
from typing import Any

from osc_lib import exceptions
from osc_lib.command import command

from vmstream.errors import VmstreamError
from vmstream.openstack.osc import logic
from vmstream.openstack.osc.client import LiveImageClient

DEFAULT_TIMEOUT_S = 600.0  # a live image of a big guest under TCG, or 10 clones on a busy host


def _count(text: str) -> int:
    try:
        return logic.positive_count(text)
    except VmstreamError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text}: give a timeout of more than 0 seconds")
    return seconds


class _Verb:
    """What every live-image command shares: the client, progress on stderr, errors as osc's."""

    app: Any

    def run(self, parsed_args: argparse.Namespace) -> int:
        try:
            result: int = super().run(parsed_args)  # type: ignore[misc]  # osc-lib's Command
            return result
        except VmstreamError as e:
            raise exceptions.CommandError(str(e)) from None

    @property
    def client(self) -> LiveImageClient:
        client: LiveImageClient = self.app.client_manager.vmstream
        return client

    def progress(self, line: str) -> None:
        self.app.stderr.write(line + "\n")
        self.app.stderr.flush()


def _timeout_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT_S, metavar="<seconds>",
                        help=f"How long to wait for {what} (default {DEFAULT_TIMEOUT_S:.0f})")


class CreateLiveImage(_Verb, command.ShowOne):
    """Make a live image of a running server (its memory and disk, captured by vmstream's Nova driver)"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("server", metavar="<server>", help="Server to make the live image of (name or ID)")
        parser.add_argument("name", metavar="<name>", help="Name of the new live image (its Glance image)")
        parser.add_argument("--no-wait", action="store_true",
                            help="Return once Nova took the request, showing the image as it is then (queued)")
        _timeout_option(parser, "the live image")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        name = logic.live_image_name(parsed_args.name)
        client = self.client
        server = client.find_server(parsed_args.server)
        logic.refuse_taken_name(name, client.images_named(name))
        image_id = client.create_live_image(str(server["id"]), name)
        if parsed_args.no_wait:
            image = client.get_image(image_id) or {"id": image_id, "name": name, "status": "queued"}
        else:
            self.progress(f"making live image {name} ({image_id}) of server {server.get('name')} ({server['id']})")
            image = client.wait_live_image(image_id, parsed_args.timeout, self.progress)
        return logic.show_image(image)


class StartLiveImage(_Verb, command.Lister):
    """Start servers from a live image, all in one Nova request (clones continue from its memory)"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("image", metavar="<image>", help="Live image to start (name or ID of its Glance image)")
        parser.add_argument("--count", type=_count, required=True, metavar="<n>", help="How many servers to start (1 or more)")
        parser.add_argument("--name", metavar="<name>",
                            help="Name of the servers; Nova numbers them <name>-1 ... <name>-N (default: the image's name)")
        parser.add_argument("--param", action="append", default=[], metavar="<key=value>",
                            help="A parameter for the clones' hooks, as server metadata (repeat for more)")
        parser.add_argument("--user-data", metavar="<file>", help="User data file for the servers")
        parser.add_argument("--flavor", metavar="<flavor>",
                            help="Flavor (name or ID; default: the flavor of the server the live image was made from)")
        parser.add_argument("--wait", action="store_true", help="Wait until every server is ACTIVE (fail if one is ERROR)")
        _timeout_option(parser, "the servers (with --wait)")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        # Everything the user typed is checked before the first request.
        count = logic.positive_count(str(parsed_args.count))
        params = logic.parse_params(parsed_args.param)
        user_data = logic.read_user_data(parsed_args.user_data) if parsed_args.user_data is not None else None
        client = self.client
        image = client.find_image(parsed_args.image)
        logic.require_live(image)
        flavor_id = str(client.find_flavor(parsed_args.flavor)["id"]) if parsed_args.flavor else logic.default_flavor(image)
        body = logic.servers_body(name=parsed_args.name or str(image["name"]), image_id=str(image["id"]), flavor_id=flavor_id,
                                  count=count, params=params, user_data=user_data)
        reservation = client.start_servers(body)
        if parsed_args.wait:
            self.progress(f"starting {count} server(s) from live image {image['name']} ({reservation})")
            servers = client.wait_servers(reservation, count, parsed_args.timeout, self.progress)
        else:
            servers = client.servers_of_reservation(reservation)
        return logic.SERVER_COLUMNS, [logic.server_row(s) for s in servers]


class ListLiveImage(_Verb, command.Lister):
    """List live images (Glance images with the property vmstream_live_image)"""

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        return logic.IMAGE_COLUMNS, [logic.image_row(i) for i in self.client.live_images()]


class ServersLiveImage(_Verb, command.Lister):
    """List the servers running from a live image"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("image", metavar="<image>", help="Live image (name or ID)")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        image = self.client.find_image(parsed_args.image)
        logic.require_live(image)
        servers = sorted(self.client.servers_of_image(str(image["id"])), key=logic.natural_name)
        return logic.SERVER_COLUMNS, [logic.server_row(s) for s in servers]


class DeleteLiveImage(_Verb, command.Command):
    """Delete a live image (refused while servers run from it)"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("image", metavar="<image>", help="Live image to delete (name or ID)")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> None:
        client = self.client
        image = client.find_image(parsed_args.image)
        logic.refuse_delete(image, client.servers_of_image(str(image["id"])))
        client.delete_image(image)
