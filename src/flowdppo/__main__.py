from flowdppo.cli import main

raise SystemExit(main())
