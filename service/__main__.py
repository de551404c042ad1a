from service.app.cli import main

if __name__ == "__main__":  # not in the probe process, which multiprocessing spawns
    raise SystemExit(main())
