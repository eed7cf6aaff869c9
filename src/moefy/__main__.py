from moefy.cli import main

raise SystemExit(main())
