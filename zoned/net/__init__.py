"""Zone networks: an egress allow-list enforced on the host, never in the guest.

A networked zone gets a tap in the host's network namespace and a /30 (plus
an IPv6 /64). Our nftables table sends everything the zone emits to one of
two places on the host: the zone's DNS resolver (answers only names its
policy allows, never into refused ranges) or the zone's transparent TCP
proxy (decides each connection by CIDR rule, or by DNS pinning plus the
TLS SNI / HTTP Host the client sent). Nothing is forwarded unless an
explicit UDP CIDR rule asks for it. See docs/networking.md.

Pure core: :mod:`policy`, :mod:`sniff`, :mod:`addressing`, :mod:`nftrules`,
:mod:`dnsfilter`, :mod:`pins`, :mod:`accounting`, :mod:`wire`.
IO shell: :mod:`engine` (resolver and proxy on trio, runs in the helper),
:mod:`helper` (the per-zone unprivileged helper process), :mod:`host`
(taps, sysctls, nftables, sockets, helper processes, reclaim).
"""
