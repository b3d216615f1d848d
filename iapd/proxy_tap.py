"""C{twistd iap-proxy}: reserved; see L{iapd.reserved_tap}."""

from .reserved_tap import reserved

Options, makeService = reserved("iap-proxy", "sensors connect to the manager directly for now")
