"""Where a protocol meets the server: each call is authenticated, admitted, read within its
limits, and counted here before any front-end sees it."""
