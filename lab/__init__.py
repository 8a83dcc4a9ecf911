"""The lab: a simulated two-site world on one machine, for the demo and the tests (not the product).

`lab.world` builds it (namespaces, links, BIRD, the WAN emulator, the services), `lab.cli`
adds `geomirror lab ...` and `geomirror demo` to the product's command line through the
entry-point group `geomirror.cli`, `lab.wanem` is the user-space WAN between the sites.
The lab imports the product; the product never imports the lab."""
