from dreamstream.cli import main

raise SystemExit(main())
