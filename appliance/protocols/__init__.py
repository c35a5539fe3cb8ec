"""Sans-I/O protocol codecs: no sockets, no greenlets, no clock."""
