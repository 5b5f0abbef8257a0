from lorakernels.build_gate.aot import main

raise SystemExit(main())
