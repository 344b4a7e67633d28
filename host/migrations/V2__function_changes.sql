-- Hosts sharing the store follow each other's deploys and deletes: every
-- change to `functions` notifies channel `gust_functions` (delivered at
-- commit) and bumps `function_changes`, which a host also polls in case it
-- missed a notification while its listening connection was down.

CREATE SEQUENCE function_changes;

CREATE FUNCTION gust_function_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM nextval('function_changes');
    PERFORM pg_notify('gust_functions', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER functions_changed
AFTER INSERT OR UPDATE OR DELETE ON functions
FOR EACH ROW EXECUTE FUNCTION gust_function_changed();
