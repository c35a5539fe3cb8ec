"""A real h2 client and server, in memory, for the mapping tests."""

import h2.config
import h2.connection
import h2.settings


def h2_pair(validate: bool = True):
    """A client and a server that exchanged prefaces and settings; the server runs like the
    frontend (bytes headers, no inbound validation) and offers extended CONNECT (RFC 8441 §3),
    without which h2 won't send :protocol."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=validate, normalize_outbound_headers=validate))
    server = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=False))
    client.initiate_connection()
    server.initiate_connection()
    server.update_settings({h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1})
    for _ in range(3):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    return client, server
