from hf_moe_offload.cli import main


raise SystemExit(main())
