"""``python deploy`` (and the packaged MAP's entry point) runs the app."""

from app import main

if __name__ == "__main__":
    main()
