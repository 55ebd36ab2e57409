from openseek_cpt.cli import main

raise SystemExit(main())
